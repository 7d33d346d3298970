"""How each checkpoint tensor is split across tensor-parallel ranks, and merging/splitting by those rules.

The rules are those of the original `tools/convert_tp.py`: vocabulary rows and column-parallel outputs on
dim 0 (the per-head [q|k|v] layout makes a contiguous split a split by heads), row-parallel inputs on dim 1,
`dense_h_to_4h` split within each GeGLU half, and LayerNorms and row-parallel biases replicated.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class Split(enum.Enum):
    REPLICATED = "replicated"
    ROWS = "dim 0"
    COLUMNS = "dim 1"
    GLU_ROWS = "dim 0 within each GeGLU half"
    # A row-parallel layer's quantization scale: each shard holds its own scales, [out] (one group per row,
    # the original's) or [out, groups] of its input columns. Split and merged on the groups: exact.
    SCALE_GROUPS = "scale groups along dim 1"
    IGNORED = "ignored"


_RULES = {
    "word_embeddings.weight": Split.ROWS,
    "input_layernorm.weight": Split.REPLICATED,
    "input_layernorm.bias": Split.REPLICATED,
    "attention.query_key_value.weight": Split.ROWS,
    "attention.query_key_value.bias": Split.ROWS,
    "attention.dense.weight": Split.COLUMNS,
    "attention.dense.bias": Split.REPLICATED,
    "post_attention_layernorm.weight": Split.REPLICATED,
    "post_attention_layernorm.bias": Split.REPLICATED,
    "mlp.dense_h_to_4h.weight": Split.GLU_ROWS,
    "mlp.dense_h_to_4h.bias": Split.GLU_ROWS,
    "mlp.dense_4h_to_h.weight": Split.COLUMNS,
    "mlp.dense_4h_to_h.bias": Split.REPLICATED,
    # Quantized checkpoints (quantization/): the int8 `weight` keys above keep their rules (INT4 packs along
    # dim 1, so a row-parallel split needs an even number of columns per shard).
    "attention.query_key_value.weight_scale": Split.ROWS,
    "mlp.dense_h_to_4h.weight_scale": Split.GLU_ROWS,
    "attention.dense.weight_scale": Split.SCALE_GROUPS,
    "mlp.dense_4h_to_h.weight_scale": Split.SCALE_GROUPS,
    "final_layernorm.weight": Split.REPLICATED,
    "final_layernorm.bias": Split.REPLICATED,
    # Rotary frequencies are recomputed, never loaded (SAT's loader ignores them too).
    "attention.rotary_emb.inv_freq": Split.IGNORED,
    "rotary_emb.inv_freq": Split.IGNORED,
}


@dataclass(frozen=True)
class ShardSpec:
    """Which tensor-parallel part of every weight a process holds: `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1


def split_rule(key: str) -> Split:
    """The rule for a full checkpoint key such as `transformer.layers.3.mlp.dense_h_to_4h.weight`."""
    parts = key.split(".")
    if parts[0] == "mixins" and key.endswith("rotary_emb.inv_freq"):
        return Split.IGNORED
    short = ".".join(parts[3:] if parts[:2] == ["transformer", "layers"] else parts[1:])
    if parts[0] != "transformer" or short not in _RULES:
        raise KeyError(f"unknown checkpoint key '{key}'")
    return _RULES[short]


def _check_divisible(key: str, size: int, parts: int) -> None:
    if size % parts:
        raise ValueError(f"{key}: size {size} is not divisible by tensor-parallel size {parts}")


def _groups(scale: Tensor) -> Tensor:
    return scale[:, None] if scale.dim() == 1 else scale  # the original's [out] scale is one group


def _group_range(key: str, count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Scale groups [start, stop) of input-column shard `rank` of `world_size`, for `count` groups in all.
    A group wider than a shard is kept whole by every shard it covers (same scale): no requantising."""
    if count % world_size == 0:
        return rank * count // world_size, (rank + 1) * count // world_size
    if world_size % count == 0:
        return rank * count // world_size, rank * count // world_size + 1
    raise ValueError(
        f"{key}: {count} quantization groups per row cannot be split into {world_size} shards exactly; "
        "choose a tensor-parallel size that divides, or is a multiple of, the group count"
    )


def _stored_scale(groups: Tensor) -> Tensor:
    return groups[:, 0] if groups.shape[1] == 1 else groups


def split_tensor(key: str, tensor: Tensor, parts: int) -> list[Tensor]:
    """Split one full tensor into `parts` rank shards (clones, so a shard saves without the whole storage)."""
    rule = split_rule(key)
    if rule is Split.REPLICATED:
        return [tensor.clone() for _ in range(parts)]
    if rule is Split.COLUMNS:
        _check_divisible(key, tensor.shape[1], parts)
        return [t.clone() for t in tensor.chunk(parts, dim=1)]
    if rule is Split.ROWS:
        _check_divisible(key, tensor.shape[0], parts)
        return [t.clone() for t in tensor.chunk(parts, dim=0)]
    if rule is Split.SCALE_GROUPS:
        groups = _groups(tensor)
        ranges = [_group_range(key, groups.shape[1], r, parts) for r in range(parts)]
        return [_stored_scale(groups[:, a:b]).clone() for a, b in ranges]
    if rule is Split.GLU_ROWS:
        _check_divisible(key, tensor.shape[0], 2 * parts)
        value, gate = tensor.chunk(2, dim=0)
        return [torch.cat([v, g]) for v, g in zip(value.chunk(parts), gate.chunk(parts), strict=True)]
    raise ValueError(f"{key} is not a model weight and cannot be split")


def merge_tensors(key: str, shards: list[Tensor]) -> Tensor:
    """Inverse of split_tensor."""
    rule = split_rule(key)
    if rule is Split.REPLICATED:
        for i, shard in enumerate(shards[1:], start=1):
            if shard.shape != shards[0].shape:
                raise ValueError(
                    f"{key}: replicated tensor has shape {tuple(shard.shape)} on rank {i} "
                    f"but {tuple(shards[0].shape)} on rank 0"
                )
        return shards[0]
    if rule is Split.SCALE_GROUPS:
        return _stored_scale(torch.cat([_groups(s) for s in shards], dim=1))
    dim = 1 if rule is Split.COLUMNS else 0
    for i, shard in enumerate(shards):
        other = [s for d, s in enumerate(shard.shape) if d != dim]
        first = [s for d, s in enumerate(shards[0].shape) if d != dim]
        if other != first:
            raise ValueError(
                f"{key}: shard shapes differ across ranks ({tuple(shards[0].shape)} on rank 0, "
                f"{tuple(shard.shape)} on rank {i})"
            )
    if rule is Split.GLU_ROWS:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=dim)


def merge_state_dicts(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Merge rank state dicts (rank order) into one; ignored keys are dropped."""
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise ValueError(f"rank {rank} holds different keys than rank 0: {', '.join(diff[:5])}")
    kept = [key for key in keys if split_rule(key) is not Split.IGNORED]
    return {key: merge_tensors(key, [s[key] for s in shards]) for key in kept}


def split_state_dict(state_dict: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """Split a full state dict into `parts` rank state dicts; ignored keys are dropped."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(parts)]
    for key, tensor in state_dict.items():
        if split_rule(key) is Split.IGNORED:
            continue
        for shard, piece in zip(shards, split_tensor(key, tensor, parts), strict=True):
            shard[key] = piece
    return shards


def split_dim(rule: Split) -> int:
    return 1 if rule in (Split.COLUMNS, Split.SCALE_GROUPS) else 0


def full_shape(key: str, shapes: Sequence[torch.Size]) -> torch.Size:
    """The unsharded shape of `key` from its shards' shapes (no data is read)."""
    rule = split_rule(key)
    if rule is Split.REPLICATED:
        for rank, shape in enumerate(shapes[1:], start=1):
            if shape != shapes[0]:
                raise ValueError(
                    f"{key}: replicated tensor has shape {tuple(shape)} on rank {rank} "
                    f"but {tuple(shapes[0])} on rank 0"
                )
        return shapes[0]
    if rule is Split.SCALE_GROUPS:
        shapes = [torch.Size([*s, 1]) if len(s) == 1 else s for s in shapes]
    dim = split_dim(rule)
    for rank, shape in enumerate(shapes):
        if len(shape) != len(shapes[0]) or any(
            a != b for d, (a, b) in enumerate(zip(shape, shapes[0], strict=True)) if d != dim
        ):
            raise ValueError(
                f"{key}: shard shapes differ across ranks ({tuple(shapes[0])} on rank 0, "
                f"{tuple(shape)} on rank {rank})"
            )
    size = list(shapes[0])
    size[dim] = sum(shape[dim] for shape in shapes)
    return torch.Size(size)


def _concat_range(pieces: Sequence[Tensor], dim: int, start: int, stop: int) -> list[Tensor]:
    """The views of `pieces` (consecutive along `dim`) that cover [start, stop) of their concatenation."""
    views, offset = [], 0
    for piece in pieces:
        size = piece.shape[dim]
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            views.append(piece.narrow(dim, lo - offset, hi - lo))
        offset += size
    return views


def slice_views(key: str, sources: Sequence[Tensor], rank: int, world_size: int) -> list[Tensor]:
    """The views of the source shards that make up part `rank` of `world_size` of `key`, in order.

    Concatenating them (along the split dim, per GeGLU half for `dense_h_to_4h`) gives the target shard.
    Only views are made: nothing is read or merged, so a memory-mapped source stays on disk except for the
    slices actually used.
    """
    rule = split_rule(key)
    if rule is Split.IGNORED:
        raise ValueError(f"{key} is not a model weight")
    if rule is Split.REPLICATED:
        full_shape(key, [s.shape for s in sources])
        return [sources[0]]
    if world_size == len(sources):  # the source shard is the target shard
        return [sources[rank]]
    if rule is Split.SCALE_GROUPS:
        groups = [_groups(s) for s in sources]
        start, stop = _group_range(key, sum(g.shape[1] for g in groups), rank, world_size)
        return _concat_range(groups, 1, start, stop)
    dim = split_dim(rule)
    halves = 2 if rule is Split.GLU_ROWS else 1
    total = full_shape(key, [s.shape for s in sources])[dim]
    _check_divisible(key, total, halves * world_size)
    part = total // halves // world_size
    views = []
    for half in range(halves):
        pieces = [s.chunk(halves, dim=0)[half] for s in sources] if halves == 2 else list(sources)
        views += _concat_range(pieces, dim, rank * part, (rank + 1) * part)
    return views
