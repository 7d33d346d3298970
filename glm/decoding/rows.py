"""The engine's rows: a static KV cache of `groups x width` rows, `prefill` and `decode_one_token`.

Cache layout. The cache holds `groups x width` rows of `max_length` positions. A group's rows are stored
interleaved by position (per layer `[G, nh, T * W, hn]`, row w's position t at column `t * W + w`), so the
keys of a whole group are one contiguous sequence and a decode step can feed the W rows of a group to the
unchanged model as W tokens of one sequence: input `[G, W]`, mask `[G, 1, W, T * W]`. The mask says which
(position, row) each row sees; shapes never change, so the step can be compiled or captured as a CUDA graph.

- Unrelated requests may share a group: each row sees only its own columns.
- The rows of one request (beams, or `n` samples) share its prompt, prefilled once into its first row.
- Beam search reorders beams by copying rows of the mask (`T * W` booleans), never keys or values: a beam
  sees, at each position, the row of the beam it descends from. Columns are written once, so ancestors'
  keys stay where they are.

Prompts are prefilled together (`Rows.prefill_many`): right-padded into one forward `[B, longest]`, similar
lengths together, at most `max_prefill_tokens` padded tokens per forward; each prompt sees only itself,
padding is seen by no one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from glm.model import GLM

log = logging.getLogger("glm.decoding")

MAX_PREFILL_TOKENS = 4096  # padded tokens (batch x longest prompt) per prefill forward


class Prompt(NamedTuple):
    """A prompt to prefill into `row` of `group`: ids [n], positions [n] and bool mask [n, n] (True =
    masked), as `glm.query.context_inputs` gives them."""

    group: int
    row: int
    ids: Sequence[int]
    positions: Tensor
    mask: Tensor


def prefill_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of prompts of these lengths, grouped into forwards of at most `max_tokens` padded tokens
    (prompts x longest), longest first so that similar lengths share a forward; a prompt longer than the
    budget runs alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def held_tensors(model: nn.Module) -> list[Tensor]:
    """The tensors a forward of `model` reads that stay where they are: parameters, buffers, and what a
    layer keeps on a helper object (a quantized layer's kernel packs its weight once, on first use), which
    torch.compile sees only as some Python object's attribute."""
    found = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for value in vars(module).values():
            helper = getattr(value, "__dict__", None)
            if isinstance(value, (Tensor, nn.Module)) or not isinstance(helper, dict):
                continue
            for item in helper.values():
                items = item if isinstance(item, tuple) else (item,)
                found.extend(t for t in items if isinstance(t, Tensor))
    return found


def cudagraph_skips() -> int:
    """CUDA-graph captures torch.compile skipped so far in this process (its inductor counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


class RowCache:
    """Static key/value buffers of `groups x width` rows (layout in the module docstring), one pair per
    layer, allocated where that layer computes. It follows `glm.model.Cache`."""

    def __init__(self, model: GLM, groups: int, width: int, max_length: int) -> None:
        self.groups, self.width, self.max_length = groups, width, max_length
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for layer in model.transformer.layers:
            attention = layer.attention
            shape = (groups, attention.num_heads, max_length * width, attention.head_dim)
            self.k.append(torch.zeros(shape, dtype=model.dtype, device=model.device))
            self.v.append(torch.zeros(shape, dtype=model.dtype, device=model.device))
        # prompts being prefilled: for each of their tokens, its (batch entry, position, group, row)
        self._prefill: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._columns: Tensor | None = None  # [G, W] columns written by a decode step
        self._bound = max_length  # positions attended by a decode step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self._prefill is not None:  # k, v [B, nh, s, hn]: B padded prompts, each into its own row
            b, t, g, w = self._prefill
            for buffer, new in ((self.k[layer], k), (self.v[layer], v)):
                view = buffer.view(self.groups, buffer.shape[1], self.max_length, self.width, -1)
                view[g, :, t, w] = new[b, :, t]  # [tokens, nh, hn]: each prompt's own tokens, no padding
            return k, v  # each prompt attends to itself (the mask)
        assert self._columns is not None
        index = self._columns[:, None, :, None].expand_as(k)  # [G, nh, W, hn]
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        end = self._bound * self.width
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def decode_slots(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int] | None:
        """Where a decode step's keys and values go (glm.model.Cache): row w of group g at its column."""
        keys = self.k[layer]
        if self._prefill is not None or keys.dtype != x.dtype or keys.device != x.device:
            return None
        assert self._columns is not None
        return keys, self.v[layer], self._columns, self._bound * self.width


class Rows:
    """The model over a RowCache: `prefill_many` prompts into rows, `decode_one_token` for every row, and
    the visibility mask that makes rows (and beams) independent.

    `compile` compiles the decode step with torch.compile (static shapes: every step attends to all
    `max_length` positions); `cuda_graphs` compiles it with mode="reduce-overhead" (CUDA graphs, GPU only).
    Without either, an eager step attends only to the positions written so far (rounded up to 32).

    A compiled engine's first decode step runs eagerly, so that every layer prepares its kernel (packed
    weights, a native extension) outside the compiled region; then every tensor the step reads and the
    cache it writes are marked static (CUDA graphs neither copy them in nor skip the capture because an
    input is mutated). A capture torch.compile skips all the same is counted in `cudagraph_skips` and logged
    once.
    """

    def __init__(
        self,
        model: GLM,
        groups: int,
        width: int,
        max_length: int,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.groups, self.width, self.max_length = groups, width, max_length
        self.device = model.device
        self.cache = RowCache(model, groups, width, max_length)
        # visible[g, query row, position, key row]
        self.visible = torch.zeros(groups, width, max_length, width, dtype=torch.bool, device=self.device)
        self.rows = torch.arange(width, device=self.device)
        self.static = compile or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self.cudagraph_skips = 0  # captures torch.compile skipped for this step (cuda_graphs only)
        self._warm = not self.static  # a compiled step is first run eagerly
        self._step = self._decode
        if self.static:
            mode = "reduce-overhead" if cuda_graphs else "default"
            self._step = torch.compile(self._decode, mode=mode, dynamic=False, fullgraph=False)
        for g in range(groups):
            self.clear(g, range(width))

    def clear(self, group: int, rows: Sequence[int]) -> None:
        """Free rows: each sees only its own first column, so no row is ever fully masked."""
        rows = list(rows)
        self.visible[group, rows] = False
        self.visible[group, rows, 0, rows] = True

    def reorder(self, sources: Tensor) -> None:
        """Row w of every group now sees what row sources[g, w] saw ([G, W]; batched beam search)."""
        groups = torch.arange(self.groups, device=self.device)[:, None]
        self.visible.copy_(self.visible[groups, sources.to(self.device)])

    def fork(self, group: int, rows: Sequence[int], sources: Sequence[int]) -> None:
        """Row rows[i] of `group` now sees what row sources[i] saw (beam reordering, prompt sharing)."""
        self.visible[group, list(rows)] = self.visible[group, list(sources)].clone()

    def prefill(
        self,
        group: int,
        row: int,
        ids: Sequence[int],
        positions: Tensor,
        mask: Tensor,
        all_logits: bool = False,
    ) -> Tensor:
        """Run a prompt [n] (positions [n], bool mask [n, n]) into `row` of `group`; the row then sees the
        prompt. Returns the logits [V] at the last position ([n, V] with all_logits)."""
        return self.prefill_many([Prompt(group, row, ids, positions, mask)], all_logits)[0]

    @torch.no_grad()
    def prefill_many(
        self, prompts: Sequence[Prompt], all_logits: bool = False, max_tokens: int = MAX_PREFILL_TOKENS
    ) -> list[Tensor]:
        """Prefill each prompt into its own (group, row), in as few right-padded forwards as `max_tokens`
        padded tokens per forward allow; each row then sees its prompt. Returns, in the order given, each
        prompt's logits [V] at its last position ([n, V] with all_logits)."""
        slots = set()
        for p in prompts:
            n = len(p.ids)
            if not 0 < n <= self.max_length:
                raise ValueError(f"a prompt of {n} tokens does not fit rows of {self.max_length} positions")
            if p.positions.shape != (n,) or p.mask.shape != (n, n) or p.mask.dtype != torch.bool:
                raise ValueError(f"a prompt of {n} tokens needs positions [{n}] and a bool mask [{n}, {n}]")
            if (p.group, p.row) in slots:
                raise ValueError(f"row {p.row} of group {p.group} is prefilled twice in one call")
            slots.add((p.group, p.row))
        logits: list[Tensor] = [torch.empty(0)] * len(prompts)
        for batch in prefill_batches([len(p.ids) for p in prompts], max_tokens):
            for i, out in zip(
                batch, self._prefill_forward([prompts[i] for i in batch], all_logits), strict=True
            ):
                logits[i] = out
        for p in prompts:
            self.visible[p.group, p.row] = False
            self.visible[p.group, p.row, : len(p.ids), p.row] = True
        return logits

    def _prefill_forward(self, prompts: Sequence[Prompt], all_logits: bool) -> list[Tensor]:
        """One forward [B, longest] of right-padded prompts; their logits (see prefill_many)."""
        lengths = [len(p.ids) for p in prompts]
        batch, s = len(prompts), max(lengths)
        ids = torch.zeros(batch, s, dtype=torch.long)
        positions = torch.zeros(batch, s, dtype=torch.long)
        # A padding query sees only itself: finite (never read), so no NaN reaches a real row through the
        # values of a padding key, which no real row sees.
        mask = ~torch.eye(s, dtype=torch.bool).expand(batch, s, s).clone()
        for b, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            ids[b, :n] = torch.tensor(list(p.ids))
            positions[b, :n] = p.positions
            mask[b, :n, :n] = p.mask  # and no real row sees padding (True from the start)
        # every real token's (batch entry, position, group, row): where the cache writes it
        slots = [
            (b, t, p.group, p.row)
            for b, (p, n) in enumerate(zip(prompts, lengths, strict=True))
            for t in range(n)
        ]
        entry, position, group, row = torch.tensor(slots, device=self.device).unbind(1)
        self.cache._prefill = (entry, position, group, row)
        try:
            at = None if all_logits else torch.tensor(lengths, device=self.device)[:, None] - 1
            out = self.model(
                ids.to(self.device), positions.to(self.device), mask[:, None].to(self.device), self.cache, at
            )
        finally:
            self.cache._prefill = None
        if all_logits:
            return [out[b, :n] for b, n in enumerate(lengths)]
        return list(out[:, 0])

    def _decode(self, tokens: Tensor, positions: Tensor, columns: Tensor, mask: Tensor) -> Tensor:
        self.cache._columns = columns
        return self.model(tokens, positions, mask, self.cache)

    @torch.no_grad()
    def decode_one_token(self, tokens: Tensor, positions: Tensor, columns: Tensor) -> Tensor:
        """Feed one token per row: tokens, positions and cache columns [G, W] (long); each row sees its new
        column from now on. Returns logits [G, W, V]."""
        g_index = torch.arange(self.groups, device=self.device)[:, None]
        self.visible[g_index, self.rows, columns, self.rows] = True
        bound = self.max_length
        if not self.static:
            bound = min(self.max_length, (int(columns.max()) + 32) // 32 * 32)
        self.cache._bound = bound
        mask = ~self.visible[:, :, :bound].reshape(self.groups, 1, self.width, bound * self.width)
        written = columns * self.width + self.rows  # [G, W]: the cache's columns
        if not self._warm:
            logits = self._decode(tokens, positions, written, mask)  # lazy preparation happens here
            for tensor in [*self.cache.k, *self.cache.v, *held_tensors(self.model)]:
                torch._dynamo.mark_static_address(tensor)
            self._warm = True
            return logits
        if not self.cuda_graphs:
            return self._step(tokens, positions, written, mask)
        # The counter is the process's: a skip while this call compiles is this step's.
        before = cudagraph_skips()
        logits = self._step(tokens, positions, written, mask)
        if skipped := cudagraph_skips() - before:
            if not self.cudagraph_skips:
                log.warning(
                    "--cuda-graphs: torch.compile did not capture the decode step as a CUDA graph (it runs "
                    "compiled without one); TORCH_LOGS=cudagraphs names the reason"
                )
            self.cudagraph_skips += skipped
        return logits
