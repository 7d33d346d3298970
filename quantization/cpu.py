"""CPU matmuls on quantized weights, chosen by what the CPU running them can do.

Decode (a few rows): the AVX2 kernel in cpu_kernels.cpp reads the stored weight bytes once (INT8 as they
are, INT4 in the original nibble layout), with the activations rounded to int16 per row. It is compiled
on first use with torch.utils.cpp_extension and cached (~/.cache/torch_extensions). Without a compiler or
AVX2 it falls back to torch's fused weight-only ops fed bf16 activations (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`; the INT4 one needs its own copy of the weight, made on first use).

Prefill (many rows): dequantise to a float weight and run one dense matmul in the dtype that is fast on
this CPU: bf16 where the CPU has AVX512-BF16 or AMX (bf16 F.linear there runs ~3 x fp32), else fp32 (on
AVX2-only CPUs bf16 F.linear is ~4 x slower than fp32). The dequantised weight lives for one call only.

Measured on both kinds of machine: bench/results/quant*.md.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from quantization.schemes import dequantize, scale_groups, unpacked_values

# Rows up to which the decode kernel beats dequantise + dense matmul (bench/quantization_kernels.py).
DECODE_MAX_ROWS = 8
_KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def prefill_dtype() -> torch.dtype:
    """The dense dtype whose matmul is fastest on this CPU."""
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled AVX2 kernels, or None (no AVX2, no compiler, or GLM_QUANT_NATIVE=0)."""
    if os.environ.get("GLM_QUANT_NATIVE", "1") == "0" or not has_avx2():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="glm_quantization_cpu",
            sources=[str(Path(__file__).with_name("cpu_kernels.cpp"))],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: the built-in ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"quantized CPU kernels not compiled ({first}); using torch's slower built-ins", stacklevel=2
        )
        return None


def _native_shape_ok(in_features: int, groups: int) -> bool:
    return (in_features // groups) % 32 == 0


def dequantized(weight: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    native = native_kernels()
    groups = scale_groups(scale)
    if native is not None and _native_shape_ok(weight.shape[1] * 8 // bits, groups.shape[1]):
        return native.dequantize(weight, groups.contiguous(), bits).to(dtype)
    return dequantize(weight, scale, bits, dtype)


class CPUKernel:
    """The decode and prefill matmuls of one quantized weight (weight and scale as stored)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._int4pack: tuple[Tensor, Tensor, int] | None = None  # the built-in INT4 op's copy

    def __call__(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """x [..., in] (any float dtype) -> [..., out] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= DECODE_MAX_ROWS:
            y = self.decode(rows, weight, scale)
        else:
            dtype = prefill_dtype()
            y = F.linear(rows.to(dtype), dequantized(weight, scale, self.bits, dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def decode(self, rows: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        groups = scale_groups(scale)
        native = native_kernels()
        if native is not None and _native_shape_ok(rows.shape[1], groups.shape[1]):
            return native.gemv(rows.float().contiguous(), weight, groups.contiguous(), self.bits)
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
            width = in_features // groups.shape[1]
            size = next((g for g in _KERNEL_GROUP_SIZES if width % g == 0), None)
            if size is None:
                return F.linear(rows.float(), dequantize(weight, groups, 4))
            # tinygemm layout: unsigned q + 8, dequantised as (u - 8) * scale + zero with zero = 0.
            unsigned = (unpacked_values(weight, 4).to(torch.int32) + 8).contiguous()
            packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
            per_kernel_group = groups.repeat_interleave(width // size, dim=1).t()  # [in / size, out]
            scales_zeros = torch.stack([per_kernel_group, torch.zeros_like(per_kernel_group)], dim=-1)
            self._int4pack = (packed, scales_zeros.to(torch.bfloat16).contiguous(), size)
        packed, scales_zeros, size = self._int4pack
        return torch._weight_int4pack_mm_for_cpu(rows, packed, size, scales_zeros).float()
