"""tinygemm's INT4 operands from a stored weight, in plain torch ops that run on any device: the CUDA path
(cuda.py, torch's `_weight_int4pack_mm`) and the CPU fallback (cpu.py, `_weight_int4pack_mm_for_cpu`).

tinygemm dequantises the unsigned 4-bit value u of output n in kernel group g as
`(u - 8) * scale[g, n] + zero[g, n]`. A stored signed nibble s in [-8, 7] (schemes.py) is u - 8 for
u = s + 8, which in 4 bits is s with its top bit flipped: `byte ^ 0x88` converts both nibbles of a byte at
once and keeps their order (column 2i in the high nibble, 2i + 1 in the low one, the order in which
torch >= 2.5's CUDA `_convert_weight_to_int4pack` reads its uint8 [N, K / 2] input, as torch's and torchao's
own packing `(q[:, ::2] << 4) | q[:, 1::2]` writes it). With zero = 0 the kernel's value is q * scale.

Kernel groups (32 to 256 columns) never span two stored groups: each stored group's scale is repeated for
every kernel group inside it (per-row INT4: the row's one scale, K / 256 times).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantization.schemes import scale_groups

GROUP_SIZES = (256, 128, 64, 32)  # the kernel group widths tinygemm takes, largest (fewest scales) first


def kernel_group_size(in_features: int, groups: int) -> int | None:
    """The widest kernel group that tiles each of `groups` stored groups of a row, or None."""
    width = in_features // groups
    return next((g for g in GROUP_SIZES if width % g == 0), None)


def unsigned_bytes(weight: Tensor) -> Tensor:
    """uint8 [N, K / 2]: the stored INT4 bytes with each signed nibble s made s + 8, order kept."""
    return (weight.view(torch.uint8) ^ 0x88).contiguous()


def unsigned_values(unsigned: Tensor) -> Tensor:
    """int32 [N, K] from `unsigned_bytes`: column 2i from the high nibble, 2i + 1 from the low one."""
    values = torch.stack([unsigned >> 4, unsigned & 0x0F], dim=-1).flatten(-2)
    return values.to(torch.int32).contiguous()


def scales_and_zeros(scale: Tensor, in_features: int, size: int) -> Tensor:
    """bf16 [K / size, N, 2]: each kernel group's scale (its stored group's, repeated) and zero (0)."""
    groups = scale_groups(scale)
    repeats = in_features // groups.shape[1] // size
    per_kernel_group = groups.repeat_interleave(repeats, dim=1).t()  # [K / size, N]
    pairs = torch.stack([per_kernel_group, torch.zeros_like(per_kernel_group)], dim=-1)
    return pairs.to(torch.bfloat16).contiguous()
