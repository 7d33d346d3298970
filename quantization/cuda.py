"""CUDA matmuls on quantized weights, in plain torch (no prebuilt binaries: the original's cpm_kernels
fatbin holds SASS for sm_61-86 only and does not load on sm_87/89/90).

* Ampere and newer (sm_80+) with torch >= 2.5, INT4 whose shape tinygemm tiles: torch's fused op
  `_weight_int4pack_mm` with bf16 activations (`Int4PackKernel`). The layer packs its weight once while
  loading (`pack_int4`; the operands' layout: tinygemm.py) and keeps only the packed form. torch 2.4 took
  another input layout for the packing op: there INT4 dequantises, with a warning.
* Everything else (INT8, V100 / RTX 2080 Ti at sm_70/75, odd shapes): `CUDAKernel` dequantises into the
  activation dtype and multiplies, as the original did, with torch ops instead of its kernels, a tile of
  weight rows at a time so the float copy stays small (the INT8 output layer's is [vocab / TP, hidden]:
  0.9 GB at TP 4). torch has no INT8 weight-only CUDA op to use instead: `_mixed_dtypes_linear` runs on
  sm_8x only and is deprecated; the CUDA `_weight_int8pack_mm` of recent torch is a naive fp32 loop.

Untested on this project's CPU machines: `pytest -m cuda` and bench/quantization_cuda.py run on a GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion

from quantization.schemes import dequantize, scale_groups
from quantization.tinygemm import kernel_group_size, scales_and_zeros, unsigned_bytes

INNER_K_TILES = 8  # tinygemm tiles K by 16 x this and N by 8
FUSED_INT4_TORCH = "2.5"  # the first torch whose _convert_weight_to_int4pack takes uint8 [N, K / 2]
DEQUANTIZE_TILE_BYTES = 64 << 20  # float bytes of weight rows CUDAKernel dequantises at a time


@functools.cache
def _warn_old_torch(version: str) -> None:
    warnings.warn(
        f"torch {version} packs INT4 weights for the fused CUDA kernel from another layout, so INT4 matmuls "
        f"dequantise instead (slower, more memory): install torch >= {FUSED_INT4_TORCH} for the fused kernel",
        stacklevel=3,
    )


def fused_int4_available(device: torch.device) -> bool:
    """Whether INT4 matmuls on `device` take the fused tinygemm op (sm_80+ and torch >= 2.5)."""
    if torch.cuda.get_device_capability(device) < (8, 0) or not hasattr(torch, "_weight_int4pack_mm"):
        return False
    if TorchVersion(torch.__version__) < FUSED_INT4_TORCH:
        _warn_old_torch(str(torch.__version__))
        return False
    return True


def fused_int4_group_size(out_features: int, in_features: int, groups: int) -> int | None:
    """The kernel group width for a weight of this shape with `groups` scales per row, or None where
    tinygemm cannot tile it (out_features not a multiple of 8, in_features not one of 128, no width)."""
    if out_features % 8 or in_features % (16 * INNER_K_TILES):
        return None
    return kernel_group_size(in_features, groups)


def pack_int4(weight: Tensor, scale: Tensor, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(packed weight int32, scales_and_zeros bf16 [K / size, N, 2]) of a stored INT4 weight, made on
    `device` (the packing op is CUDA's; meta counts shapes) and returned on the stored weight's device."""
    home = weight.device
    unsigned = unsigned_bytes(weight.to(device))
    packed = torch._convert_weight_to_int4pack(unsigned, INNER_K_TILES)
    pairs = scales_and_zeros(scale.to(device), weight.shape[1] * 2, size)
    return packed.to(home), pairs.to(home)


class Int4PackKernel:
    """The fused INT4 matmul on a weight packed by `pack_int4` (called with it in place of weight and
    scale)."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def __call__(self, x: Tensor, packed: Tensor, scales_zeros: Tensor) -> Tensor:
        # The op takes contiguous bf16 rows: a view of wider rows (a slice of the last dim) is copied.
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm(rows, packed, self.group_size, scales_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class CUDAKernel:
    """The matmul of one quantized weight as stored (weight and scale): dequantise a tile of rows, then
    multiply it into its output columns."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def __call__(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        out_features, in_features = weight.shape[0], x.shape[-1]
        tile = max(1, DEQUANTIZE_TILE_BYTES // (in_features * x.element_size()))
        if tile >= out_features:
            return F.linear(x, dequantize(weight, scale, self.bits, x.dtype))
        groups = scale_groups(scale)
        y = x.new_empty(*x.shape[:-1], out_features)
        for start in range(0, out_features, tile):
            end = min(start + tile, out_features)
            w = dequantize(weight[start:end], groups[start:end], self.bits, x.dtype)
            y[..., start:end] = F.linear(x, w)
        return y
