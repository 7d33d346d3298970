"""Weight quantization schemes: symmetric absmax per row (GLM-130B's) or per group of input columns.

One representation covers both. A weight [out, in] is stored as

    weight        int8 [out, in]       (INT8)   or   int8 [out, in / 2]   (INT4, two values per byte)
    weight_scale  fp16 [out]           one scale per row (the original's layout: a single group per row)
                  fp16 [out, groups]   one scale per group of `in / groups` consecutive input columns

and dequantises to `q * scale` of its group. Values are in [-127, 127] (scale = absmax / 127) or [-7, 7]
(scale = absmax / 7), as the original. INT4 packing is the original's: byte i of a row holds column 2i in
its high nibble and column 2i + 1 in its low nibble, both as signed 4-bit values.

A row-parallel layer's shards each hold their own scales for the same rows, so merging them gives a weight
with one group per shard: re-sharding is exact in this representation (glm/sharding.py, SCALE_GROUPS).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantization.spec import QuantizationSpec


def quantize_weight(weight: Tensor, spec: QuantizationSpec) -> tuple[Tensor, Tensor]:
    """(values int8 [out, in] in [-max, max], scale fp16 [out] or [out, groups]) of a float weight.

    The scale is rounded to fp16 before dividing, and a fp16 weight is divided in fp16, as the original did
    on the GPU: its quantized checkpoints are reproduced byte for byte from its fp16 weights. Other dtypes
    divide in fp32. An all-zero row or group gets scale 0 and values 0 (the original produced NaN there).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    groups = spec.groups(in_features)
    compute = torch.float16 if weight.dtype == torch.float16 else torch.float32
    grouped = weight.to(compute).reshape(out_features, groups, in_features // groups)
    scale = (grouped.abs().amax(dim=-1) / spec.max_value).half()  # [out, groups]
    divisor = scale.masked_fill(scale == 0, 1).to(compute)[..., None]
    values = torch.round(grouped / divisor).clamp_(-spec.max_value, spec.max_value).to(torch.int8)
    values = values.reshape(out_features, in_features)
    return values, (scale.squeeze(1) if spec.scheme == "row" else scale)


def quantize_to_stored(
    weight: Tensor, spec: QuantizationSpec, rows_per_chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """(`weight`, `weight_scale`) as a checkpoint stores them, made a block of rows at a time so the
    temporaries stay small beside the result (quantize while loading)."""
    out_features, in_features = weight.shape
    stored = torch.empty(
        out_features, spec.packed_columns(in_features), dtype=torch.int8, device=weight.device
    )
    scales = []
    for start in range(0, out_features, rows_per_chunk):
        values, scale = quantize_weight(weight[start : start + rows_per_chunk], spec)
        stored[start : start + rows_per_chunk] = stored_weight(values, spec.bits)
        scales.append(scale)
    return stored, torch.cat(scales)


def pack_int4(values: Tensor) -> Tensor:
    """int8 [rows, cols] in [-8, 7] -> int8 [rows, cols / 2]: column 2i high nibble, 2i + 1 low nibble."""
    if values.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even number of columns, got {values.shape[-1]}")
    high, low = values[..., 0::2], values[..., 1::2]
    return ((high << 4) | (low & 0x0F)).to(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: sign-extended nibbles, int8 [rows, 2 * cols]."""
    high = packed >> 4  # arithmetic shift: sign-extends
    low = (packed << 4) >> 4  # int8 arithmetic: the low nibble moved up, then sign-extended back
    return torch.stack([high, low], dim=-1).flatten(-2)


def stored_weight(values: Tensor, bits: int) -> Tensor:
    """The `weight` tensor a checkpoint holds for values from quantize_weight."""
    return pack_int4(values) if bits == 4 else values


def unpacked_values(weight: Tensor, bits: int) -> Tensor:
    """int8 [out, in] values from a stored `weight`."""
    return unpack_int4(weight) if bits == 4 else weight


def scale_groups(scale: Tensor) -> Tensor:
    """A stored scale as [out, groups] (the original's 1-D per-row scale is one group)."""
    return scale[:, None] if scale.dim() == 1 else scale


def dequantize(weight: Tensor, scale: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight [out, in] a stored (weight, weight_scale) stands for, computed in `dtype`.

    In fp32 the product q * scale is exact; in fp16 it is the original kernel's `half(q) * scale`.
    """
    values = unpacked_values(weight, bits)
    groups = scale_groups(scale)
    out_features, in_features = values.shape
    if in_features % groups.shape[1]:
        raise ValueError(f"{groups.shape[1]} scale groups do not divide {in_features} input columns")
    grouped = values.to(dtype).reshape(out_features, groups.shape[1], -1) * groups.to(dtype)[..., None]
    return grouped.reshape(out_features, in_features)
