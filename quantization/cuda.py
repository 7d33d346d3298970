"""CUDA matmuls on quantized weights, in plain torch (no prebuilt binaries: the original's cpm_kernels
fatbin holds SASS for sm_61-86 only and does not load on sm_87/89/90).

* Ampere and newer (sm_80+), INT4 with kernel-compatible groups: torch's fused tinygemm op
  `_weight_int4pack_mm` with bf16 activations. Its packed form is made once, on first use, from the stored
  bytes: the original's nibble order is tinygemm's, and a signed nibble s becomes the unsigned s + 8 by
  flipping its top bit (byte ^ 0x88); scales are repeated per kernel group, zeros are 0.
* Everything else (INT8, V100 / RTX 2080 Ti at sm_70/75, odd group widths): dequantise into the
  activation dtype and matmul, as the original did, but with torch ops instead of its kernels.

Untested on this project's CPU machines: `pytest -m cuda` and bench/quantization_cuda.py run on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantization.schemes import dequantize, scale_groups

_TINYGEMM_GROUP_SIZES = (256, 128, 64, 32)


def fused_int4_available(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0) and hasattr(torch, "_weight_int4pack_mm")


class CUDAKernel:
    """The matmul of one quantized weight on a CUDA device (weight and scale as stored)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._int4pack: tuple[Tensor, Tensor, int] | None = None
        self._fused: bool | None = None

    def __call__(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        if self._fused is None:
            self._fused = (
                self.bits == 4 and fused_int4_available(weight.device) and self._prepare(weight, scale)
            )
        if self._fused:
            packed, scales_zeros, size = self._int4pack
            rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            y = torch._weight_int4pack_mm(rows, packed, size, scales_zeros)
            return y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return F.linear(x, dequantize(weight, scale, self.bits, x.dtype))

    def _prepare(self, weight: Tensor, scale: Tensor) -> bool:
        groups = scale_groups(scale)
        width = weight.shape[1] * 2 // groups.shape[1]
        size = next((g for g in _TINYGEMM_GROUP_SIZES if width % g == 0), None)
        if size is None or weight.shape[1] * 2 % 128:  # tinygemm tiles K by 16 x innerKTiles (8)
            return False
        unsigned = (weight.view(torch.uint8) ^ 0x88).contiguous()
        packed = torch._convert_weight_to_int4pack(unsigned, 8)
        per_kernel_group = groups.repeat_interleave(width // size, dim=1).t()  # [in / size, out]
        scales_zeros = torch.stack([per_kernel_group, torch.zeros_like(per_kernel_group)], dim=-1)
        self._int4pack = (packed, scales_zeros.to(torch.bfloat16).contiguous(), size)
        return True
