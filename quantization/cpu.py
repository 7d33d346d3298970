"""CPU matmuls on quantized weights, chosen by what the CPU running them can do.

Decode (a few rows): the AVX2 kernel in cpu_kernels.cpp reads the stored weight bytes once (INT8 as they
are, INT4 in the original nibble layout), with the activations rounded to int16 per row. It is compiled
on first use with torch.utils.cpp_extension and cached (~/.cache/torch_extensions). Without a compiler or
AVX2 an fp32 model dequantises and multiplies in fp32 (as prefill does), and a bf16 model takes torch's
fused weight-only ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; the INT4 one needs its own
copy of the weight, made on first use).

Prefill (many rows) in fp32: the GEMM registered by `use_prefill_gemm` (glm's blocked GEMM, which
dequantises each packed tile exactly, so its result is the fp32 GEMM of the dequantised weight). Otherwise,
and in other dtypes: dequantise the weight (in tiles of rows of at most PREFILL_TILE_BYTES) into a float
buffer that each thread keeps for its next call, and multiply each tile into its columns of the output with
one dense matmul in the activations' dtype. A fresh float weight per call would page-fault (50 MB: 36 ms);
the kept buffer costs at most the tile size.

Precision follows the model's dtype and never the CPU: an fp32 model computes in fp32 on every CPU (bf16
prefill, ~3 x faster where the CPU has AVX512-BF16 or AMX but ~3e-3 relative error, only with
`--dtype bfloat16`), so the same flags give the same tokens and scores on every kind of machine. The one
approximation of an fp32 model is the decode kernel's int16 rounding of the activations (relative error
<= 1 / 65534 of each row's largest value per element), identical on every CPU with AVX2. Without the
kernels (no AVX2 or no compiler) fp32 decode dequantises and multiplies in fp32; torch's fused bf16 ops
serve bf16 models only.

Measured on both kinds of machine: bench/results/quant*.md.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from quantization.native import load_extension
from quantization.schemes import dequantize, scale_groups
from quantization.tinygemm import kernel_group_size, scales_and_zeros, unsigned_bytes, unsigned_values

# Rows up to which the decode kernel beats dequantise + dense matmul (bench/quantization_kernels.py).
DECODE_MAX_ROWS = 8
# Float bytes of one dequantised prefill tile at most (glm-600m's block weights are one tile each). MKL's
# sgemm with 512 x 1536 activations runs ~1.3 x slower on 1024 weight rows than on >= 4096.
PREFILL_TILE_BYTES = 32 << 20
_scratch = threading.local()  # each thread's tile buffers by dtype, kept for its next call (no page faults)
# An fp32 GEMM that dequantises the weight per tile itself (rows [M, in], weight, scale [out, groups] fp16,
# bits) -> [M, out], or None where it cannot run. A dense kernel library registers it (glm registers its
# blocked GEMM, glm/cpu_matmul.py); without one, prefill dequantises tiles and multiplies with torch.mm.
PrefillGemm = Callable[[Tensor, Tensor, Tensor, int], "Tensor | None"]
_prefill_gemm: list[PrefillGemm] = []


def use_prefill_gemm(gemm: PrefillGemm) -> None:
    """Run fp32 prefill matmuls through `gemm` (see PrefillGemm), where it can."""
    _prefill_gemm[:] = [gemm]


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled AVX2 kernels, or None (no AVX2, no compiler, GLM_NATIVE=0 or GLM_QUANT_NATIVE=0)."""
    if os.environ.get("GLM_QUANT_NATIVE", "1") == "0":
        return None
    return load_extension("glm_quantization_cpu", Path(__file__).with_name("cpu_kernels.cpp"))


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dense dtype a quantized matmul computes in for activations of `dtype`: theirs (fp16 widened to
    fp32, since CPU fp16 matmuls are slow and no more exact)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _native_shape_ok(in_features: int, groups: int) -> bool:
    return (in_features // groups) % 32 == 0


def _tile_buffer(rows: int, columns: int, dtype: torch.dtype) -> Tensor:
    if not hasattr(_scratch, "buffers"):
        _scratch.buffers = {}
    buffers = _scratch.buffers
    if dtype not in buffers or buffers[dtype].numel() < rows * columns:
        buffers[dtype] = torch.empty(rows * columns, dtype=dtype)
    return buffers[dtype][: rows * columns].view(rows, columns)


def quantized_matmul(rows: Tensor, weight: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """rows [M, in] x the dequantised weight^T -> [M, out] in `dtype`, dequantising at most
    PREFILL_TILE_BYTES of weight rows at a time into this thread's reused buffer."""
    if torch.is_grad_enabled() and rows.requires_grad:  # out= below records no autograd
        return F.linear(rows.to(dtype), dequantize(weight, scale, bits, dtype))
    groups = scale_groups(scale).contiguous()
    if dtype == torch.float32 and _prefill_gemm:
        y = _prefill_gemm[0](rows.float().contiguous(), weight, groups, bits)
        if y is not None:
            return y
    out_features, in_features = weight.shape[0], rows.shape[1]
    tiles = max(1, math.ceil(out_features * in_features * 4 / PREFILL_TILE_BYTES))
    tile = max(1, math.ceil(out_features / tiles))  # even tiles
    native = native_kernels()
    if not _native_shape_ok(in_features, groups.shape[1]):
        native = None
    x = rows.to(dtype)
    y = torch.empty(rows.shape[0], out_features, dtype=dtype)
    for start in range(0, out_features, tile):
        end = min(start + tile, out_features)
        if native is not None:
            buffer = _tile_buffer(end - start, in_features, torch.float32)
            w = native.dequantize(weight[start:end], groups[start:end], bits, buffer)
            if dtype != torch.float32:
                w = _tile_buffer(end - start, in_features, dtype).copy_(w)
        else:
            w = dequantize(weight[start:end], groups[start:end], bits, dtype)
        torch.mm(x, w.t(), out=y[:, start:end])  # BLAS writes the column block in place
    return y


class CPUKernel:
    """The decode and prefill matmuls of one quantized weight (weight and scale as stored)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._int4pack: tuple[Tensor, Tensor, int] | None = None  # the built-in INT4 op's copy
        self._groups: tuple[Tensor, Tensor] | None = None  # (scale, its [out, groups] view) of the last call

    def __call__(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """x [..., in] (any float dtype) -> [..., out] in x's dtype."""
        k = x.shape[-1]
        if x.dtype == torch.float32 and x.numel() <= DECODE_MAX_ROWS * k:  # decode: the common case, lean
            native = native_kernels()
            if self._groups is None or self._groups[0] is not scale:
                self._groups = (scale, scale_groups(scale).contiguous())
            groups = self._groups[1]
            if native is not None and _native_shape_ok(k, groups.shape[1]):
                return native.gemv(x if x.is_contiguous() else x.contiguous(), weight, groups, self.bits)
        rows = x.reshape(-1, k)
        if rows.shape[0] <= DECODE_MAX_ROWS:
            y = self.decode(rows, weight, scale)
        else:
            y = quantized_matmul(rows, weight, scale, self.bits, matmul_dtype(x.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def decode(self, rows: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        groups = scale_groups(scale)
        native = native_kernels()
        if native is not None and _native_shape_ok(rows.shape[1], groups.shape[1]):
            return native.gemv(rows.float().contiguous(), weight, groups.contiguous(), self.bits)
        if rows.dtype != torch.bfloat16:  # exact: torch's fused ops below take bf16 activations
            return quantized_matmul(rows, weight, scale, self.bits, matmul_dtype(rows.dtype))
        if self.bits == 8:
            return self._int8pack(rows.bfloat16(), weight, groups)
        return self._int4pack_mm(rows.bfloat16(), weight, groups)

    @staticmethod
    def _int8pack(rows: Tensor, weight: Tensor, groups: Tensor) -> Tensor:
        # The op has one scale per row: sum the products of each group of columns.
        width = weight.shape[1] // groups.shape[1]
        scales = groups.to(torch.bfloat16)
        out = None
        for g in range(groups.shape[1]):
            part = torch._weight_int8pack_mm(
                rows[:, g * width : (g + 1) * width].contiguous(),
                weight[:, g * width : (g + 1) * width].contiguous(),
                scales[:, g].contiguous(),
            ).float()
            out = part if out is None else out + part
        return out

    def _int4pack_mm(self, rows: Tensor, weight: Tensor, groups: Tensor) -> Tensor:
        if self._int4pack is None:
            in_features = weight.shape[1] * 2
            size = kernel_group_size(in_features, groups.shape[1])
            if size is None:
                return F.linear(rows.float(), dequantize(weight, groups, 4))
            # tinygemm's operands (tinygemm.py); the CPU op takes the unsigned values unpacked, int32 [N, K].
            unsigned = unsigned_values(unsigned_bytes(weight))
            packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
            self._int4pack = (packed, scales_and_zeros(groups, in_features, size), size)
        packed, scales_zeros, size = self._int4pack
        return torch._weight_int4pack_mm_for_cpu(rows, packed, size, scales_zeros).float()
