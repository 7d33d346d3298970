"""P-tuning v2 (Liu et al., 2022): trainable keys and values every layer's attention sees before the tokens.

`apply_prefix` gives each block a `Prefix` holding `key` and `value` [N, nh, hn] (N =
`PrefixOptions.length`, nh the heads the layer computes) and a forward pre-hook on the block that

* hands the block a `PrefixCache` in place of its cache: it lets the real cache (if any) store and return
  the tokens' keys and values as it always does, then puts the prefix in front of them, so the KV cache
  holds only real tokens and the prefix is attended at every prefill and decode step;
* widens the attention mask by N visible columns on the left, so every query position attends to the
  prefix (a padding row, never read, now attends to it too).

The prefix keys are used as they are (no rotary: they have no position), and the tokens' position ids are
unchanged. Every other parameter is frozen. The prefix is stored directly (no reparameterising MLP: on
these models training the keys and values themselves converges, and the MLP would be dropped after
training anyway). A fresh prefix is initialised from the keys and values the base model itself computes
for N random tokens (Li & Liang's initialisation from real activations), so training starts from an
in-distribution context rather than from noise; unlike a fresh LoRA it does change the output from the
start. A prefix cannot be merged into the weights.

Under tensor parallelism a layer's prefix is its own heads' slice (the heads are split contiguously, as the
per-head [q|k|v] rows of `query_key_value` are); `full_state_dict` / `load_full_state_dict` work on the
unsharded [N, nh, hn] tensors.

Why not `peft`'s prefix tuning: it is not installed, and it works through Hugging Face model classes'
`past_key_values` argument and cache objects, which this model (and its decoding engine's caches) do not
have; the hook is 60 lines and composes with any `Cache`, quantized or streamed layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from glm.adapters.shards import SHARDED, check_tensor_names, gather_shards, mark
from glm.model import GLM, Cache, GLMBlock
from glm.sharding import ShardSpec


@dataclass(frozen=True)
class PrefixOptions:
    length: int = 16

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"--prefix-length {self.length}: must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PrefixOptions:
        return cls(**data)


class Prefix(nn.Module):
    """One layer's trainable prefix: `key` and `value` [N, nh, hn] (fp32)."""

    def __init__(self, length: int, heads: int, head_dim: int, device: torch.device) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.zeros(length, heads, head_dim, device=device))
        self.value = nn.Parameter(torch.zeros(length, heads, head_dim, device=device))
        for p in (self.key, self.value):
            mark(p, SHARDED)  # this rank's heads (the whole prefix in one process)

    @property
    def length(self) -> int:
        return self.key.shape[0]

    def expanded(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """key and value as [b, nh, N, hn] in `like`'s dtype and device (like: keys [b, nh, t, hn])."""
        b = like.shape[0]
        out = []
        for p in (self.key, self.value):
            p = p.to(like.device, like.dtype).transpose(0, 1)  # [nh, N, hn]
            out.append(p.unsqueeze(0).expand(b, -1, -1, -1))
        return out[0], out[1]


class PrefixCache:
    """A `Cache` putting one layer's prefix in front of the keys and values `inner` returns (or of the new
    ones, without a cache)."""

    def __init__(self, inner: Cache | None, prefix: Prefix) -> None:
        self.inner, self.prefix = inner, prefix

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(layer, k, v)
        pk, pv = self.prefix.expanded(k)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def _widen(mask: Tensor, length: int) -> Tensor:
    """mask [b, 1, s, t] (bool, True = masked, or an additive float bias) with `length` visible columns in
    front."""
    return torch.cat([mask.new_zeros(*mask.shape[:-1], length), mask], dim=-1)


def _pre_hook(block: GLMBlock, args: tuple) -> tuple:
    x, cos, sin, mask, cache = args
    prefix: Prefix = block.prefix
    return x, cos, sin, _widen(mask, prefix.length), PrefixCache(cache, prefix)


class _Recorder:
    """A `Cache` that keeps each layer's new keys and values (for the initialisation)."""

    def __init__(self) -> None:
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer], self.v[layer] = k, v
        return k, v


@torch.no_grad()
def _initialise(model: GLM, length: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(model.device)
    positions = torch.arange(length, device=model.device)[None]
    mask = torch.zeros(1, 1, length, length, dtype=torch.bool, device=model.device)
    recorder = _Recorder()
    model(
        ids,
        positions,
        mask,
        cache=recorder,
        logits_at=torch.zeros(1, 1, dtype=torch.long, device=model.device),
    )
    for i, block in enumerate(model.transformer.layers):
        prefix: Prefix = block.prefix
        prefix.key.copy_(recorder.k[i][0].transpose(0, 1).float())  # [nh, N, hn] -> [N, nh, hn]
        prefix.value.copy_(recorder.v[i][0].transpose(0, 1).float())


def apply_prefix(model: GLM, options: PrefixOptions, seed: int = 0, initialise: bool = True) -> GLM:
    """Freeze every parameter of `model` and give every block a trainable prefix (in place; returns the
    model). `initialise`: from the base's own keys and values for `seed`'s random tokens (see the module
    docstring); False leaves zeros, for a prefix about to be loaded or a model on the meta device."""
    if getattr(model, "ptuning", None) is not None:
        raise ValueError("the model already holds a P-tuning prefix")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.layers:
        attention = block.attention  # on the block, not in the attention offload may stream
        block.prefix = Prefix(options.length, attention.num_heads, attention.head_dim, model.device)
    if initialise:
        _initialise(model, options.length, seed)
    for block in model.transformer.layers:  # after the initialisation, which must not see a prefix
        block.register_forward_pre_hook(_pre_hook)
    model.ptuning = options
    return model


def prefix_layers(model: GLM) -> dict[str, Prefix]:
    """The prefixes by name, e.g. `transformer.layers.0.prefix`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Prefix)}


def whole(model: GLM) -> Callable[[str, Tensor], Tensor]:
    """`(key, t) -> t whole`: for this rank's heads `t` of a prefix tensor (`NAME.key` / `NAME.value`, or
    anything shaped like it: a gradient, an optimizer moment), all the heads. Under tensor parallelism a
    collective: every rank calls it, for the same keys in the same order."""
    shard: ShardSpec = getattr(model, "shard", ShardSpec())

    def gather(key: str, t: Tensor) -> Tensor:
        return torch.cat(gather_shards(t, shard), dim=1) if shard.world_size > 1 else t

    return gather


def part(model: GLM) -> Callable[[str, Tensor], Tensor]:
    """`(key, t) -> this rank's heads of t`, the inverse of `whole`."""
    shard: ShardSpec = getattr(model, "shard", ShardSpec())

    def split(key: str, t: Tensor) -> Tensor:
        return t.chunk(shard.world_size, dim=1)[shard.rank] if shard.world_size > 1 else t

    return split


def full_state_dict(model: GLM) -> dict[str, Tensor]:
    """Every prefix tensor, unsharded (`NAME.key`, `NAME.value` [N, nh, hn]), on the CPU in fp32. Under
    tensor parallelism this gathers the heads (a collective: every rank calls it)."""
    gather = whole(model)
    out = {}
    for name, prefix in prefix_layers(model).items():
        for what in ("key", "value"):
            key = f"{name}.{what}"
            out[key] = gather(key, getattr(prefix, what).detach().float()).cpu()
    return out


def load_full_state_dict(model: GLM, state: dict[str, Tensor]) -> None:
    """Copy unsharded prefix tensors into the model's prefixes, each rank taking its heads. A missing, extra
    or misshapen tensor is a ValueError naming it."""
    layers = prefix_layers(model)
    check_tensor_names(state, {f"{n}.{w}" for n in layers for w in ("key", "value")})
    split = part(model)
    with torch.no_grad():
        for name, prefix in layers.items():
            for what in ("key", "value"):
                param, value = getattr(prefix, what), split(f"{name}.{what}", state[f"{name}.{what}"])
                if param.shape != value.shape:
                    raise ValueError(
                        f"adapter tensor {name}.{what} has shape {tuple(value.shape)}, the model needs "
                        f"{tuple(param.shape)} (another --prefix-length?)"
                    )
                param.copy_(value)
