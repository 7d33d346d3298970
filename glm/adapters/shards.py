"""What both adapter methods need to save and load their tensors whole: a tensor-parallel gather of one
tensor's shards, and the check that a file's tensors are the model's; and how each trainable tensor is
held under tensor parallelism, which the fine-tuning loop reads to sum and clip gradients
(glm/finetune/gradients.py)."""

from __future__ import annotations

from torch import Tensor, nn

from glm.sharding import ShardSpec

# How a trainable adapter tensor is held under tensor parallelism (`mark`, `held_as`):
SHARDED = "sharded"  # each rank holds its own part, and that part's whole gradient
REPLICATED = "replicated"  # every rank holds it whole, with the same, whole gradient
PARTIAL = "partial"  # every rank holds it whole, but its gradient is each rank's partial sum


def mark(param: nn.Parameter, held: str) -> nn.Parameter:
    """Record how `param` is held (SHARDED, REPLICATED or PARTIAL); returns it."""
    param.tensor_parallel = held
    return param


def held_as(param: Tensor) -> str:
    """How `param` is held: what `mark` recorded, REPLICATED when nothing was."""
    return getattr(param, "tensor_parallel", REPLICATED)


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
