"""LoRA: a trainable low-rank update `scaling * B A` beside a frozen linear layer (Hu et al., 2021).

`apply_lora` swaps each chosen linear layer of every block for a `LoRALinear` that holds the original
layer as `base` (a glm.model.Linear, a quantized layer of quantization.layers, a tensor-parallel shard or a
streamed layer: anything computing y = x W^T + b) and computes

    y = base(x) + scaling * (dropout(x) A^T) B^T,   A [r, in], B [out, r], scaling = alpha / r.

B starts at zero, so a fresh adapter gives exactly the base model's output. The base is never changed.

Under tensor parallelism the adapter's shards follow the layer's split: a column-parallel layer
(`query_key_value`, `dense_h_to_4h`) keeps all of A and its own rows of B (split as the layer's weight
rows, within each GeGLU half for `dense_h_to_4h`); a row-parallel layer (`attention.dense`,
`mlp.dense_4h_to_h`) keeps its own input columns of A and all of B, and sums the small `x A^T` [.., r] over
the ranks with the layer's own `reduce` before B. A is initialised whole and sliced, and a row-parallel
shard's dropout mask is the whole input's, sliced, so a run at any tensor-parallel size trains the
one-process adapter. `full_state_dict` / `load_full_state_dict` work on the unsharded tensors, so an adapter
file is the same whatever tensor-parallel size trained or loads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm.adapters.shards import PARTIAL, REPLICATED, SHARDED, check_tensor_names, gather_shards, mark
from glm.model import GLM
from glm.sharding import ShardSpec, merge_tensors, split_tensor

# Block-relative names of the linear layers a LoRA may adapt.
TARGETS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
ROW_PARALLEL = ("attention.dense", "mlp.dense_4h_to_h")  # their inputs are split under tensor parallelism


@dataclass(frozen=True)
class LoRAOptions:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention.query_key_value", "attention.dense")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout {self.dropout}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA target modules {unknown or '(none)'}: choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> LoRAOptions:
        return cls(**{**data, "targets": tuple(data["targets"])})


class LoRALinear(nn.Module):
    """`base(x)` plus the low-rank update; see the module docstring. `row_parallel` marks a layer whose
    input is split across ranks (its base's `reduce` then sums the update's rank-r projection too); `shard`
    is this process's part of the tensor-parallel model."""

    def __init__(
        self,
        base: nn.Module,
        options: LoRAOptions,
        row_parallel: bool,
        device: torch.device,
        shard: ShardSpec | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.row_parallel = row_parallel
        self.shard = shard = shard or ShardSpec()
        self.scaling = options.scaling
        self.dropout_p = options.dropout
        self.in_features, self.out_features = base.in_features, base.out_features
        # A is initialised whole (as one process does, from the same random numbers) and sliced, so the
        # adapter gathered from the ranks is the one-process adapter whatever the tensor-parallel size.
        split = shard.world_size if row_parallel else 1
        a = torch.empty(options.rank, self.in_features * split, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.lora_A = nn.Parameter(a.chunk(split, dim=1)[shard.rank % split].contiguous())
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, options.rank, device=device))
        # under tensor parallelism: which tensor is this rank's part, and whose gradient is a partial sum
        mark(self.lora_A, SHARDED if row_parallel else PARTIAL)
        mark(self.lora_B, REPLICATED if row_parallel else SHARDED)

    def dropout(self, x: Tensor) -> Tensor:
        """Dropout of the adapter's input; a row-parallel shard draws the mask of the whole input (as one
        process draws it, from the same random numbers on every rank) and keeps its own columns."""
        if not self.training or not self.dropout_p:
            return x
        if not self.row_parallel or self.shard.world_size == 1:
            return F.dropout(x, self.dropout_p, True)
        n, width = self.shard.world_size, x.shape[-1]
        keep = F.dropout(x.new_ones(*x.shape[:-1], width * n), self.dropout_p, True)
        return x * keep[..., self.shard.rank * width : (self.shard.rank + 1) * width]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # [.., r]
        reduce = getattr(self.base, "reduce", None)
        if self.row_parallel and reduce is not None:
            h = reduce(h)  # the partial products of the local input columns, summed over the ranks
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B A [out, in] (this shard's part), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _parent(block: nn.Module, target: str) -> tuple[nn.Module, str]:
    parent_name, name = target.split(".")
    return getattr(block, parent_name), name


def apply_lora(model: GLM, options: LoRAOptions, seed: int = 0) -> GLM:
    """Freeze every parameter of `model` and wrap the target layers of every block in a `LoRALinear`
    (in place; returns the model). `seed` gives A's initialisation: the same whole A on every rank, and at
    every tensor-parallel size."""
    for p in model.parameters():
        p.requires_grad_(False)
    shard: ShardSpec = getattr(model, "shard", ShardSpec())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for block in model.transformer.layers:
            for target in options.targets:
                parent, name = _parent(block, target)
                base = getattr(parent, name)
                if isinstance(base, LoRALinear):
                    raise ValueError(f"{target} already holds a LoRA adapter")
                device = model.device if base.bias is None or base.bias.is_meta else base.bias.device
                layer = LoRALinear(base, options, target in ROW_PARALLEL, device, shard)
                setattr(parent, name, layer)
    finally:
        torch.random.set_rng_state(generator_state)
    model.lora = options
    return model


def lora_layers(model: GLM) -> dict[str, LoRALinear]:
    """The LoRA layers by their checkpoint-style name, e.g. `transformer.layers.0.attention.dense`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _weight_key(name: str) -> str:
    return f"{name}.weight"  # the base layer's checkpoint key: its split rule is the adapter's


def whole(model: GLM) -> Callable[[str, Tensor], Tensor]:
    """`(key, t) -> t whole`: for this rank's part `t` of an adapter tensor (`NAME.lora_A` / `NAME.lora_B`,
    or anything shaped like it: a gradient, an optimizer moment), the unsharded tensor. Under tensor
    parallelism a collective: every rank calls it, for the same keys in the same order."""
    shard: ShardSpec = getattr(model, "shard", ShardSpec())
    layers = lora_layers(model)

    def gather(key: str, t: Tensor) -> Tensor:
        name, what = key.rsplit(".", 1)
        if shard.world_size > 1 and (what == "lora_A") == layers[name].row_parallel:
            return merge_tensors(_weight_key(name), gather_shards(t, shard))
        return t

    return gather


def part(model: GLM) -> Callable[[str, Tensor], Tensor]:
    """`(key, t) -> this rank's part of t`, the inverse of `whole`."""
    shard: ShardSpec = getattr(model, "shard", ShardSpec())
    layers = lora_layers(model)

    def split(key: str, t: Tensor) -> Tensor:
        name, what = key.rsplit(".", 1)
        if shard.world_size > 1 and (what == "lora_A") == layers[name].row_parallel:
            return split_tensor(_weight_key(name), t, shard.world_size)[shard.rank]
        return t

    return split


def full_state_dict(model: GLM) -> dict[str, Tensor]:
    """Every adapter tensor, unsharded (`NAME.lora_A`, `NAME.lora_B`), on the CPU in fp32. Under tensor
    parallelism this gathers the shards (a collective: every rank calls it)."""
    gather = whole(model)
    out = {}
    for name, layer in lora_layers(model).items():
        for what in ("lora_A", "lora_B"):
            key = f"{name}.{what}"
            out[key] = gather(key, getattr(layer, what).detach().float()).cpu()
    return out


def load_full_state_dict(model: GLM, state: dict[str, Tensor]) -> None:
    """Copy unsharded adapter tensors into the model's LoRA layers, each rank taking its slice. A missing,
    extra or misshapen tensor is a ValueError naming it."""
    layers = lora_layers(model)
    check_tensor_names(state, {f"{n}.lora_{w}" for n in layers for w in "AB"})
    split = part(model)
    with torch.no_grad():
        for name, layer in layers.items():
            for what in ("lora_A", "lora_B"):
                param, value = getattr(layer, what), split(f"{name}.{what}", state[f"{name}.{what}"])
                if param.shape != value.shape:
                    raise ValueError(
                        f"adapter tensor {name}.{what} has shape {tuple(value.shape)}, the model needs "
                        f"{tuple(param.shape)} (another rank or target set?)"
                    )
                param.copy_(value)


def merge_into(
    state_dict: dict[str, Tensor],
    adapter: dict[str, Tensor],
    scaling: float,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """A full float state dict with every adapted weight replaced by W + scaling B A, computed in fp32 and
    stored in `dtype` (None: the weight's own); the other tensors are passed through (cast to `dtype`)."""
    merged = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in state_dict.items()}
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        name = key.removesuffix(".lora_A")
        weight = state_dict[_weight_key(name)]
        if not weight.is_floating_point():
            raise ValueError(
                f"{_weight_key(name)} is quantized: merge into the float checkpoint, then quantize"
            )
        delta = (adapter[f"{name}.lora_B"].float() @ adapter[key].float()) * scaling
        merged[_weight_key(name)] = (weight.float() + delta).to(dtype or weight.dtype)
    return merged
