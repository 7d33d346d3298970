"""What both adapter methods need to save and load their tensors whole: a tensor-parallel gather of one
tensor's shards, and the check that a file's tensors are the model's."""

from __future__ import annotations

from torch import Tensor

from glm.sharding import ShardSpec


def gather_shards(t: Tensor, shard: ShardSpec) -> list[Tensor]:
    """Every rank's copy of `t`, in rank order (a collective over the tensor-parallel group)."""
    import torch
    import torch.distributed as dist

    from glm.distributed import current

    parts = [torch.empty_like(t) for _ in range(shard.world_size)]
    dist.all_gather(parts, t.contiguous(), group=current().tensor_group)
    return parts


def check_tensor_names(state: dict[str, Tensor], expected: set[str]) -> None:
    """A ValueError naming the first missing and unexpected tensors when `state` does not hold `expected`."""
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"adapter tensors do not fit the model: missing {missing[:2]}, unexpected {extra[:2]}"
        )
