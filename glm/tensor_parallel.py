"""The tensor-parallel transform: shard the plain model in place, on the meta device, before weights load.

Rank r of N keeps (the original's split rules, glm/sharding.py):
- `query_key_value`: the rows of heads [r*nh/N, (r+1)*nh/N) (column parallel; the per-head [q|k|v] layout
  makes a contiguous split a split by heads), so attention and the KV cache hold only the local heads;
- `dense_h_to_4h`: the r-th N-th of each GeGLU half, so every value row keeps its gate row;
- `attention.dense`, `mlp.dense_4h_to_h`: the matching input columns (row parallel): the partial products
  are summed by one all-reduce, then the (replicated) bias is added once;
- `word_embeddings`: vocabulary rows [r*V/N, (r+1)*V/N); other ids embed to zeros, then one all-reduce. The
  tied output layer computes the local vocabulary's logits, all-gathered along the last dim, and only at the
  positions the caller asks for (`logits_at`).
Per forward: 2 all-reduces of [b, s, h] per layer, 1 for the embeddings, 1 all-gather of [b, k, V/N].
The collectives are differentiable where a gradient flows (fine-tuning an adapter): a sum's gradient passes
through, a gather's is sliced, and the input of every column-parallel computation (attention, the MLP, the
output layer) sums its gradient over the ranks on the way back (`EnterColumnParallel`), so each rank's
backward computes the one-process gradient of every tensor it holds whole, and its slice of every sharded
one (an adapter's replicated tensor whose gradient is a per-rank partial sum, as a column-parallel LoRA's
A, is summed by the fine-tuning loop: glm/finetune/gradients.py).
The transform sets `model.shard`, so the loader reads exactly these slices from the checkpoint, whatever
tensor-parallel size it was saved with. With N = 1 it changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from glm.checkpoint import CheckpointError, check_tensor_parallel_size
from glm.config import GLMConfig
from glm.distributed import Parallel, current
from glm.loading import Transform
from glm.model import GLM, Linear, OutputLayer
from glm.sharding import ShardSpec


class _Sum(torch.autograd.Function):
    """The sum over the group; its gradient passes through as it is (every rank holds the whole sum, so
    every rank's gradient of it is already the whole gradient: Megatron's `g`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Enter(torch.autograd.Function):
    """x as it is (every rank holds the same x) going into a column-parallel layer; its gradient is the sum
    of the ranks' partial gradients, one per rank's slice of the layer's outputs (Megatron's `f`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _gather_last_dim(x: Tensor, group: Any, world_size: int) -> Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _Gather(torch.autograd.Function):
    """The ranks' tensors concatenated along the last dim; the gradient of this rank's part is its slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, world_size: int, rank: int) -> Tensor:
        ctx.world_size, ctx.rank = world_size, rank
        return _gather_last_dim(x, group, world_size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad.chunk(ctx.world_size, dim=-1)[ctx.rank].contiguous(), None, None, None


def _differentiable(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class AllReduce:
    """Sum a tensor over the group (in place when no gradient flows through it)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, x: Tensor) -> Tensor:
        if _differentiable(x):
            return _Sum.apply(x, self.group)
        dist.all_reduce(x, group=self.group)
        return x


class EnterColumnParallel:
    """The input of a column-parallel computation (query_key_value, dense_h_to_4h, the output layer): the
    identity forward; backward, the sum of the ranks' partial gradients. Without it, training under tensor
    parallelism would send each rank's layers below only their own heads' part of the gradient."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, x: Tensor) -> Tensor:
        return _Enter.apply(x, self.group) if _differentiable(x) else x


class AllGatherLastDim:
    """Concatenate the ranks' tensors along the last dim, in rank order."""

    def __init__(self, group: Any, world_size: int, rank: int | None = None) -> None:
        self.group, self.world_size = group, world_size
        self.rank = dist.get_rank(group) if rank is None else rank

    def __call__(self, x: Tensor) -> Tensor:
        if _differentiable(x):
            return _Gather.apply(x, self.group, self.world_size, self.rank)
        return _gather_last_dim(x, self.group, self.world_size)


def _enter_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input through its `enter` (EnterColumnParallel)."""
    return (module.enter(args[0]), *args[1:])


def _enter_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook: the module's output through its `enter` (the final LayerNorm feeds the output layer)."""
    return module.enter(output)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the vocabulary; ids elsewhere give zeros before the sum."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, reduce: AllReduce) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.start = start
        self.reduce = reduce

    def forward(self, input_ids: Tensor) -> Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [b, s, h]
        return self.reduce(x.masked_fill_(outside[..., None], 0.0))


def check_size(config: GLMConfig, size: int) -> None:
    """A one-line error, before any weight is read, for a size that cannot split this model."""
    check_tensor_parallel_size(config, size)
    if config.inner_hidden_size % size:
        raise CheckpointError(
            f"tensor-parallel size {size} must divide the GeGLU inner size {config.inner_hidden_size} "
            "(each rank keeps matching value and gate rows)"
        )


def _resize(linear: Linear, out_features: int, in_features: int) -> None:
    """Give a meta Linear its local shape; a row-parallel layer keeps its full (replicated) bias."""
    dtype = linear.weight.dtype
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta", dtype=dtype))
    if linear.bias is not None and out_features != linear.out_features:
        linear.bias = nn.Parameter(torch.empty(out_features, device="meta", dtype=dtype))
    linear.out_features, linear.in_features = out_features, in_features


def apply_tensor_parallel(model: GLM, rank: int, world_size: int, group: Any = None) -> GLM:
    """Shard `model` (on the meta device) in place for `rank` of `world_size`; see the module docstring."""
    config = model.config
    check_size(config, world_size)
    if world_size == 1:
        return model
    if not model.transformer.final_layernorm.weight.is_meta:
        raise ValueError("apply_tensor_parallel shards a model built on the meta device, before loading")
    reduce, enter = AllReduce(group), EnterColumnParallel(group)
    h, n = config.hidden_size, world_size
    for layer in model.transformer.layers:
        attention, mlp = layer.attention, layer.mlp
        attention.num_heads = config.num_attention_heads // n
        _resize(attention.query_key_value, 3 * h // n, h)
        _resize(attention.dense, h, h // n)
        attention.dense.reduce = reduce
        _resize(mlp.dense_h_to_4h, 2 * config.inner_hidden_size // n, h)
        _resize(mlp.dense_4h_to_h, h, config.inner_hidden_size // n)
        mlp.dense_4h_to_h.reduce = reduce
        # on the modules around the column-parallel layers (a quantized layer replaces the layer itself)
        for module in (attention, mlp):
            module.enter = enter
            module.register_forward_pre_hook(_enter_inputs)
    final_layernorm = model.transformer.final_layernorm
    final_layernorm.enter = enter
    final_layernorm.register_forward_hook(_enter_output)
    rows = config.vocab_size // n
    with torch.device("meta"):
        embeddings = VocabParallelEmbedding(rows, h, rank * rows, reduce)
    embeddings.weight.requires_grad_(False)
    model.transformer.word_embeddings = embeddings
    model.output_layer = OutputLayer(embeddings)
    model.output_layer.gather = AllGatherLastDim(group, n, rank)
    model.shard = ShardSpec(rank, world_size)
    return model


def transform(parallel: Parallel | None = None) -> Transform:
    """The tensor-parallel transform for this process's replica (by default glm.distributed's job)."""
    parallel = parallel or current()

    def shard(model: GLM) -> GLM:
        return apply_tensor_parallel(
            model, parallel.tensor_rank, parallel.tensor_parallel_size, parallel.tensor_group
        )

    return shard
