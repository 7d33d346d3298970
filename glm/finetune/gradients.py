"""The adapter's gradients after the backward pass, under tensor parallelism as in one process: the partial
sums of a tensor every rank holds whole are summed over the ranks (a column-parallel LoRA's A: each rank's
rows of B see only their part of the gradient), and clipping uses the norm of the whole adapter's gradient
(each sharded part counted once, each replicated tensor once). In one process both are plain."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from glm.adapters.shards import PARTIAL, SHARDED, held_as
from glm.distributed import current


def sum_partial_gradients(params: Sequence[Tensor]) -> None:
    """Sum, over the tensor-parallel ranks, the gradients of the tensors marked PARTIAL (in place)."""
    parallel = current()
    if parallel.tensor_parallel_size == 1:
        return
    for p in params:
        if p.grad is not None and held_as(p) == PARTIAL:
            dist.all_reduce(p.grad, group=parallel.tensor_group)


def clip_gradients(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm` (as torch's clip_grad_norm_:
    the factor max_norm / (norm + 1e-6), at most 1); returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    squares = {SHARDED: torch.zeros((), device=device), "whole": torch.zeros((), device=device)}
    for p in params:
        if p.grad is not None:
            kind = SHARDED if held_as(p) == SHARDED else "whole"
            squares[kind] += p.grad.detach().float().pow(2).sum()
    parallel = current()
    if parallel.tensor_parallel_size > 1:  # the sharded parts' squares, summed over the ranks
        dist.all_reduce(squares[SHARDED], group=parallel.tensor_group)
    norm = (squares[SHARDED] + squares["whole"]).sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return norm
