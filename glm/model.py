"""The GLM-130B architecture in plain PyTorch.

Post-LN DeepNorm blocks, 1-D rotary embeddings on the whole head (half-split layout), per-head [q|k|v]
projections, attention through `F.scaled_dot_product_attention`, GeGLU, a final LayerNorm and an output
layer tied to the word embeddings. Module names equal the original checkpoint's keys, so its state dicts
load as they are. The model knows nothing of ranks, devices or quantization: those are transforms applied
to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm import cpu_decode
from glm.config import GLMConfig
from glm.cpu_matmul import linear


class Cache(Protocol):
    """What the model asks of a KV cache: each layer hands it the new keys and values (after rotary) and
    attends to what it returns. `KVCache` below and the decoding engine's rows (glm.decoding.rows)."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


# A cache may also offer `decode_slots(layer, x) -> (keys, values, columns, length) | None`: the buffers
# [>= b, nh, T, hn] (contiguous, x's dtype) where layer `layer` keeps its keys and values, the column [b, s]
# (int64) each new token of x [b, s, h] goes to, and how many leading columns the step attends to. The fused
# decode block (glm/cpu_decode.py) then writes the keys and values itself, in the same call as the rest of
# the block; the call counts as that layer's `update`. None: call `update`.


class KVCache:
    """Static key/value buffers, one pair per layer, allocated once where that layer computes; a `Cache`.

    Keys are stored after rotary. Rows are batch entries (beams included); `length` tokens are cached, and
    the last layer's update moves `length` past the tokens it wrote. A layer's buffers hold the heads that
    layer computes (its local heads under tensor parallelism).
    """

    def __init__(self, k: list[Tensor], v: list[Tensor]) -> None:
        self.k, self.v = k, v  # per layer [b, nh, t, hn]
        self.length = 0
        self._columns: tuple[int, Tensor] | None = None  # decode_slots' (length, columns) of this forward

    @classmethod
    def for_model(cls, model: GLM, batch_size: int, max_length: int) -> KVCache:
        k, v = [], []
        for layer in model.transformer.layers:
            attention = layer.attention
            shape = (batch_size, attention.num_heads, max_length, attention.head_dim)
            k.append(torch.zeros(shape, dtype=model.dtype, device=model.device))
            v.append(torch.zeros(shape, dtype=model.dtype, device=model.device))
        return cls(k, v)

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [b, nh, s, hn] after the cached tokens; return all keys and values so far."""
        b, s = k.shape[0], k.shape[2]
        end = self.length + s
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} requested")
        self.k[layer][:b, :, self.length : end] = k
        self.v[layer][:b, :, self.length : end] = v
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:b, :, :end], self.v[layer][:b, :, :end]

    def decode_slots(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int] | None:
        """Where x [b, s, h]'s keys and values go (see `Cache`): columns length .. length + s."""
        keys = self.k[layer]
        if keys.dtype != x.dtype or keys.device != x.device or not keys.is_contiguous():
            return None
        b, s = x.shape[0], x.shape[1]
        end = self.length + s
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} requested")
        if self._columns is None or self._columns[0] != self.length or self._columns[1].shape != (b, s):
            self._columns = (self.length, torch.arange(self.length, end).expand(b, s))
        columns = self._columns[1]
        if layer == len(self.k) - 1:
            self.length = end
        return keys, self.v[layer], columns, end

    def reorder(self, rows: Tensor) -> None:
        """Make row i hold what row rows[i] held (beam search), for the first len(rows) rows."""
        n = rows.numel()
        for buffers in (self.k, self.v):
            for buffer in buffers:
                buffer[:n, :, : self.length] = buffer[rows.to(buffer.device), :, : self.length]


@functools.cache
def _inverse_frequencies(head_dim: int, base: float, device: torch.device) -> Tensor:
    """1 / base^(2i / hn), made once per shape and device (a decode step asks for them every step)."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


LOOKUP_MAX_TOKENS = 64  # up to this many positions (decode steps), rotary_tables looks them up in a table


def rotary_tables(
    position_ids: Tensor, head_dim: int, base: float, fp16_tables: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin [b, s, 1, hn] for arbitrary per-token positions [b, s] (GPT-NeoX half-split layout).

    A CPU decode step's few positions are rows of a table of positions 0 .. 2^n - 1 made once (by
    `_rotary_from_positions` too: a few gathers instead of a dozen small ops every step)."""
    few = position_ids.numel() <= LOOKUP_MAX_TOKENS
    if few and position_ids.is_cpu and not torch.compiler.is_compiling():
        low, high = position_ids.aminmax()
        if int(low) >= 0:
            length = max(LOOKUP_MAX_TOKENS, 1 << int(high).bit_length())
            cos, sin = _rotary_table(length, head_dim, base, fp16_tables, dtype)  # [length, 1, hn]
            return cos[position_ids], sin[position_ids]
    return _rotary_from_positions(position_ids, head_dim, base, fp16_tables, dtype)


@functools.lru_cache(maxsize=16)
def _rotary_table(
    length: int, head_dim: int, base: float, fp16_tables: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    cos, sin = _rotary_from_positions(torch.arange(length)[None], head_dim, base, fp16_tables, dtype)
    return cos[0], sin[0]


def _rotary_from_positions(
    position_ids: Tensor, head_dim: int, base: float, fp16_tables: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    inv_freq = _inverse_frequencies(head_dim, base, position_ids.device)
    if fp16_tables:  # SAT 0.2.12: positions, frequencies and their product in fp16
        angles = (position_ids.half()[..., None] * inv_freq.half()).float()
    else:
        angles = position_ids.float()[..., None] * inv_freq  # [b, s, hn/2]
    cos, sin = angles.cos(), angles.sin()
    if fp16_tables:
        cos, sin = cos.half(), sin.half()
    cos = torch.cat([cos, cos], dim=-1)[:, :, None, :]  # [b, s, 1, hn]
    sin = torch.cat([-sin, sin], dim=-1)[:, :, None, :]  # first half negated: see apply_rotary
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + [-x2, x1] * sin for x = [x1, x2] (halves of the last dim), with rotary_tables' sin whose
    first half is negated: the same products, with one roll in place of two slices, a negation and a cat."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Linear(nn.Linear):
    """nn.Linear with the two seams the transforms use.

    `linear(x, bias)` computes x W^T (+ bias): a quantized layer overrides it. `reduce`, when set (tensor
    parallelism sets it on row-parallel layers), sums the partial products across ranks before the bias is
    added, so the bias is added once, not once per rank.
    """

    reduce: Callable[[Tensor], Tensor] | None = None

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return linear(x, self.weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.reduce is None:
            return self.linear(x, self.bias)
        return self.reduce(self.linear(x, None)) + self.bias


class OutputLayer(nn.Module):
    """Logits from the word embeddings (tied): holds no weights of its own, so no state-dict keys.

    `gather`, when set (vocabulary-parallel tensor parallelism), assembles the full vocabulary from the
    local logits.
    """

    gather: Callable[[Tensor], Tensor] | None = None

    def __init__(self, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self._tied = [word_embeddings]  # a list, so the embedding is not registered twice

    @property
    def weight(self) -> Tensor:
        return self._tied[0].weight

    def forward(self, x: Tensor) -> Tensor:
        logits = linear(x, self.weight)
        return logits if self.gather is None else self.gather(logits)


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int) -> None:
        super().__init__()
        # Heads held by this module; a tensor-parallel transform lowers it when it shards the weights.
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.layer_id = layer_id
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Cache | None) -> Tensor:
        b, s, _ = x.shape
        nh, hn = self.num_heads, self.head_dim
        qkv = self.query_key_value(x).view(b, s, nh, 3, hn)  # per head [q|k|v]
        qk = apply_rotary(qkv[:, :, :, :2], cos[:, :, :, None], sin[:, :, :, None])  # q and k at once
        q, k, v = qk[:, :, :, 0], qk[:, :, :, 1], qkv[:, :, :, 2]  # each [b, s, nh, hn]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, nh, s, hn]
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [b, nh, t, hn]
        # The original's query-key layer scaling (scores divided by the layer number, multiplied back in fp32)
        # only guards fp16 scores against overflow; SDPA computes softmax(q k^T / sqrt(hn)) with fp32
        # accumulation, the same math, without materialising [b, nh, s, t] scores. Masked scores get no
        # weight (the original's -10000 fill underflows to 0 in the softmax); a fully masked row (padding,
        # never read) gives zeros instead of the original's uniform average.
        # mask: bool (True = masked) or the additive float bias GLM.forward makes once for every layer
        bias = ~mask if mask.dtype == torch.bool else mask
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [b, nh, s, hn]
        return self.dense(context.transpose(1, 2).reshape(b, s, nh * hn))


class GeGLU(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.inner_hidden_size)
        self.dense_4h_to_h = Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.dense_h_to_4h(x).chunk(2, dim=-1)  # first half linear, second half gated
        return self.dense_4h_to_h(value * F.gelu(gate))


class GLMBlock(nn.Module):
    """DeepNorm post-LN block: the residual is taken from the normalised input, scaled by alpha."""

    def __init__(self, config: GLMConfig, layer_id: int) -> None:
        super().__init__()
        self.alpha = config.deepnorm_alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GeGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Cache | None) -> Tensor:
        fused = cpu_decode.operands(self, x, mask, Linear)  # a few rows on the CPU: glm/cpu_decode.py
        if fused is not None:
            return cpu_decode.block_forward(self, x, cos, sin, mask, cache, fused)
        a = self.input_layernorm(x)
        h = self.alpha * a + self.attention(a, cos, sin, mask, cache)
        m = self.post_attention_layernorm(h)
        return self.alpha * m + self.mlp(m)


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLM(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.output_layer = OutputLayer(self.transformer.word_embeddings)
        # Where activations live and the KV cache is allocated. The loader sets it; with offload the weights
        # may sit elsewhere (CPU memory, disk) while the computation stays here.
        self.compute_device: torch.device | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        if self.compute_device is not None:
            return self.compute_device
        return self.transformer.final_layernorm.weight.device

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache.for_model(self, batch_size, max_length)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        cache: Cache | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Logits [b, s, vocab] for input_ids and position_ids [b, s].

        attention_mask is bool [b or 1, 1, s, t], True = masked, where t = s plus the tokens already in
        `cache` (which this call extends by s). `logits_at` [b, k] selects the positions whose logits are
        computed, giving [b, k, vocab] (the output layer is the largest matmul at long prompts).
        """
        if attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be bool, True = masked")
        x = self.transformer.word_embeddings(input_ids).to(self.dtype)  # [b, s, h] (16-bit storage: widened)
        cos, sin = rotary_tables(
            position_ids,
            self.config.head_dim,
            self.config.rotary_base,
            self.config.rotary_fp16_tables,
            x.dtype,
        )
        # 0 / -inf, as SDPA makes of a bool mask: once here instead of in every layer
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=attention_mask.device)
        bias.masked_fill_(attention_mask, float("-inf"))
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, bias, cache)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))  # [b, k, h]
        x = self.transformer.final_layernorm(x)
        return self.output_layer(x)


def init_random_weights(model: GLM, seed: int = 0, std: float = 0.02) -> GLM:
    """Fill every parameter deterministically (for benchmarks and untrained models)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                values = torch.randn(param.shape, generator=generator) * std
                param.copy_(values.to(param.dtype))
    return model
