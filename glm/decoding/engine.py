"""The decoding engine: a static KV cache of rows, `prefill` and `decode_one_token`, and continuous batching.

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

Requests carry their own strategy (glm.strategies, batch size 1 or `n`), budget, stop ids and strings,
random generator, penalties and log-probs, so a request gets the same tokens in any batch as alone. A
request joins at the next step and leaves when it is done. The prompts joining at one step are prefilled
together (`Rows.prefill_many`): right-padded into one forward `[B, longest]`, similar lengths together, at
most `max_prefill_tokens` padded tokens per forward; each prompt sees only itself, padding is seen by no one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from glm.distributed import synchronized
from glm.model import GLM
from glm.strategies import BaseStrategy, BeamSearchStrategy

Strategy = BaseStrategy | BeamSearchStrategy

MAX_PREFILL_TOKENS = 4096  # padded tokens (batch x longest prompt) per prefill forward


def context_inputs(
    length: int, mask_position: int | None, unidirectional: bool = False
) -> tuple[Tensor, Tensor]:
    """Positions [n] and the bool mask [n, n] (True = masked) of a context of `length` tokens ending in
    `sop`, as `glm.decoding.build_inputs` lays them out."""
    n = length
    positions = torch.arange(n)
    if mask_position is not None:
        positions[n - 1] = mask_position
    if unidirectional:
        visible = torch.ones(n, n, dtype=torch.bool).tril()
    else:
        visible = torch.zeros(n, n, dtype=torch.bool)
        visible[:, : n - 1] = True  # the context before sop, bidirectional
        visible[n - 1, n - 1] = True  # sop sees itself (and the context)
    return positions, ~visible


class Prompt(NamedTuple):
    """A prompt to prefill into `row` of `group`: ids [n], positions [n] and bool mask [n, n] (True =
    masked), as `context_inputs` gives them."""

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


class RowCache:
    """Static key/value buffers of `groups x width` rows (layout in the module docstring), one pair per
    layer, allocated where that layer computes. `update` follows `glm.model.KVCache`'s protocol."""

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
        self._index: Tensor | None = None  # [G, 1, W, 1] columns written by a decode step
        self._bound = max_length  # positions attended by a decode step

    @property
    def length(self) -> int:
        return 0  # rows keep their own lengths

    @length.setter
    def length(self, value: int) -> None:
        pass  # the model counts tokens on its KVCache; a fixed value here keeps compiled steps valid

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self._prefill is not None:  # k, v [B, nh, s, hn]: B padded prompts, each into its own row
            b, t, g, w = self._prefill
            for buffer, new in ((self.k[layer], k), (self.v[layer], v)):
                view = buffer.view(self.groups, buffer.shape[1], self.max_length, self.width, -1)
                view[g, :, t, w] = new[b, :, t]  # [tokens, nh, hn]: each prompt's own tokens, no padding
            return k, v  # each prompt attends to itself (the mask)
        assert self._index is not None
        index = self._index.expand_as(k)  # [G, nh, W, hn]
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        end = self._bound * self.width
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Rows:
    """The model over a RowCache: `prefill_many` prompts into rows, `decode_one_token` for every row, and
    the visibility mask that makes rows (and beams) independent.

    `compile` compiles the decode step with torch.compile (static shapes: every step attends to all
    `max_length` positions); `cuda_graphs` compiles it with mode="reduce-overhead" (CUDA graphs, GPU only).
    Without either, an eager step attends only to the positions written so far (rounded up to 32).
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

    def _decode(self, tokens: Tensor, positions: Tensor, index: Tensor, mask: Tensor) -> Tensor:
        self.cache._index = index
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
        index = (columns * self.width + self.rows)[:, None, :, None]  # [G, 1, W, 1]
        return self._step(tokens, positions, index, mask)


# ------------------------------------------------------------------------------------------------ requests


@dataclass
class Penalties:
    """Repetition (CTRL / HF: a seen token's logit divided by it if positive, multiplied if negative;
    prompt and generated tokens), presence and frequency (OpenAI: minus presence if generated at all, minus
    frequency per time generated). All off by default."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0


@dataclass
class TokenLogprobs:
    """Log-probs (of the model's distribution, before temperature, filters and penalties) of the chosen
    token and the `top` most likely ones."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """One output of a request: the generated ids (without the end token), why it ended ("stop": an end
    token, stop id or stop string; "length": the budget), and its log-probs when asked for."""

    ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    text: str | None = None  # cut before a stop string, when stop strings were given


@dataclass(eq=False)
class Request:
    """A prompt (ending in `sop`) and how to continue it.

    `strategy` decides every token: a BaseStrategy over `strategy.batch_size` rows (independent samples of
    the prompt) or a BeamSearchStrategy of batch size 1. End tokens belong in the strategy; `stop_strings`
    need the engine's `detokenize`. `on_step(request)` is called after every step (streaming),
    `on_finish(request)` once `outputs` is set.
    """

    prompt: list[int]
    strategy: Strategy
    max_new_tokens: int
    mask_position: int | None = None  # None: [gMASK] positions continue after the prompt
    unidirectional: bool = False
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k alternatives
    penalties: Penalties = field(default_factory=Penalties)
    on_step: Callable[[Request], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    tag: Any = None  # the caller's

    # state, set by the engine
    outputs: list[Output] | None = None
    error: BaseException | None = None
    cancelled: bool = False
    tokens: Tensor | None = None  # [elements, beams, prompt + generated]
    steps: int = 0
    _group: int = -1
    _rows: list[int] = field(default_factory=list)
    _logprobs: list[list[TokenLogprobs]] = field(default_factory=list)  # per row (sampling)
    _stopped: list[str | None] = field(default_factory=list)  # per row: the text cut at a stop string
    _counts: Tensor | None = None  # [rows, V] generated-token counts (penalties)

    @property
    def width(self) -> int:
        """Rows the request takes."""
        return self.strategy.batch_size * self.strategy.num_beams

    @property
    def done(self) -> bool:
        return self.outputs is not None

    def generated(self, row: int = 0) -> list[int]:
        """Row `row`'s generated ids so far, before an end token; for beam search row 0 is the best live
        beam."""
        if self.tokens is None:
            return []
        flat = self.tokens.view(-1, self.tokens.shape[-1])
        end = strategy_of(self).end_tokens
        out = []
        for token in flat[row, len(self.prompt) :].tolist():
            if token < 0 or token in end:
                break
            out.append(token)
        return out

    def settled(self) -> list[int]:
        """Generated ids no later step can change: for beam search, the prefix that every live and finished
        beam shares (beam search's streaming); for sampling, row 0's tokens."""
        if not isinstance(strategy_of(self), BeamSearchStrategy) or self.tokens is None:
            return self.generated(0)
        n = len(self.prompt)
        beams = [row[n:] for row in self.tokens[0].tolist()]
        beams += [list(b[n:]) for b in strategy_of(self).end_beams[0]]
        common = beams[0]
        for beam in beams[1:]:
            k = 0
            while k < min(len(common), len(beam)) and common[k] == beam[k]:
                k += 1
            common = common[:k]
        end = set(self.strategy.end_tokens)
        cut = next((i for i, t in enumerate(common) if t in end or t < 0), len(common))
        return common[:cut]


class QueueFull(Exception):
    """The engine's waiting queue is full."""


class Engine:
    """Continuous batching over a Rows pool: `submit` requests from any thread, `step` from one.

    Each step admits waiting requests that fit (first come first served; a request needs `width` rows of
    one group and `prompt + max_new_tokens` positions) and prefills them together (at most
    `max_prefill_tokens` padded tokens per forward), runs one decode step for every running request and
    retires those that are done. `detokenize` is needed for stop strings.
    """

    def __init__(
        self,
        model: GLM,
        groups: int = 4,
        width: int = 4,
        max_length: int | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
        max_queue: int = 0,
        compile: bool = False,
        cuda_graphs: bool = False,
        max_prefill_tokens: int = MAX_PREFILL_TOKENS,
    ) -> None:
        max_length = max_length or model.config.max_sequence_length
        self.rows = Rows(model, groups, width, max_length, compile=compile, cuda_graphs=cuda_graphs)
        self.vocab = model.config.vocab_size
        self.detokenize = detokenize
        self.max_queue = max_queue  # 0: unbounded
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free = [list(range(width)) for _ in range(groups)]
        self._lock = threading.Lock()
        self.device = model.device

    # ---- admission

    def check(self, request: Request) -> None:
        """Raise ValueError if the request can never run on this engine."""
        if request.width > self.rows.width:
            raise ValueError(
                f"the request needs {request.width} rows in one group; this engine's groups have "
                f"{self.rows.width}"
            )
        if isinstance(request.strategy, BeamSearchStrategy) and request.strategy.batch_size != 1:
            raise ValueError("a beam-search request holds one prompt: strategy batch_size must be 1")
        if not request.prompt:
            raise ValueError("the prompt is empty: it needs at least the sop token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        total = len(request.prompt) + request.max_new_tokens
        if total > self.rows.max_length:
            raise ValueError(
                f"prompt {len(request.prompt)} + max_new_tokens {request.max_new_tokens} = {total} tokens "
                f"exceeds the engine's {self.rows.max_length} positions"
            )
        if request.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need an engine with detokenize")

    def submit(self, request: Request) -> None:
        """Queue a request (thread-safe); QueueFull if `max_queue` requests are already waiting."""
        self.check(request)
        with self._lock:
            if self.max_queue and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stop a request at the next step and free its rows (thread-safe)."""
        request.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def _admit(self) -> None:
        """Admit what fits, prefill it together, start each; again while first-token finishes free rows."""
        while admitted := self._take_fitting():
            for request, logits in zip(admitted, self._prefill(admitted), strict=True):
                try:
                    if isinstance(logits, Exception):
                        raise logits
                    self._start(request, logits)
                except Exception as error:  # a bad request must not stop the others
                    request.error = error
                    self._release(request)
                    self._finish(request, [])
                    continue
                if not request.done:  # else it finished at its first token
                    self.running.append(request)

    def _take_fitting(self) -> list[Request]:
        """Waiting requests, in order, while each finds rows; each is given its rows."""
        taken = []
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled:
                with self._lock:
                    self.waiting.popleft()
                self._finish(request, [])
                continue
            group = next((g for g, free in enumerate(self._free) if len(free) >= request.width), None)
            if group is None:
                break
            with self._lock:
                self.waiting.popleft()
            rows, self._free[group] = self._free[group][: request.width], self._free[group][request.width :]
            request._group, request._rows = group, rows
            taken.append(request)
        return taken

    def _prefill(self, requests: list[Request]) -> list[Tensor | Exception]:
        """Each request's next-token logits [V] after its prompt, prefilled into its first row: together,
        or, if that fails, one by one, so that only a bad request gets its error."""
        prompts = [
            Prompt(
                r._group,
                r._rows[0],
                r.prompt,
                *context_inputs(len(r.prompt), r.mask_position, r.unidirectional),
            )
            for r in requests
        ]
        try:
            return list(self.rows.prefill_many(prompts, max_tokens=self.max_prefill_tokens))
        except Exception as error:
            if len(prompts) == 1:
                return [error]
        results: list[Tensor | Exception] = []  # the batch failed: isolate the bad prompt
        for prompt in prompts:
            try:
                results.append(self.rows.prefill_many([prompt])[0])
            except Exception as error:
                results.append(error)
        return results

    def _start(self, request: Request, logits: Tensor) -> None:
        """Start a request from its prefilled prompt's logits [V]: its rows share the prompt, first token."""
        request.strategy = synchronized(request.strategy)  # tensor parallel: rank 0 decides
        self.rows.fork(request._group, request._rows, [request._rows[0]] * request.width)
        elements = request.strategy.batch_size
        request.tokens = torch.tensor([[request.prompt]] * elements, device=self.device)  # [n, 1, L]
        request._logprobs = [[] for _ in range(request.width)]
        request._stopped = [None] * request.width
        if request.penalties.active:
            request._counts = torch.zeros(request.width, logits.shape[-1], device=self.device)
        self._advance(request, logits.expand(elements, 1, -1))

    # ---- one token

    def _penalize(self, request: Request, logits: Tensor) -> Tensor:
        """logits [rows, V] with the request's penalties applied."""
        p, counts = request.penalties, request._counts
        assert counts is not None
        counts = counts[: logits.shape[0]]  # beam search's first step has one row
        logits = logits.float().clone()
        if p.repetition != 1.0:
            seen = counts > 0
            seen[:, torch.tensor(request.prompt, device=logits.device)] = True
            scaled = torch.where(logits > 0, logits / p.repetition, logits * p.repetition)
            logits = torch.where(seen, scaled, logits)
        return logits - p.frequency * counts - p.presence * (counts > 0).float()

    def _advance(self, request: Request, logits: Tensor) -> None:
        """One strategy step for a request from its logits [elements, beams, V]."""
        strategy, tokens = request.strategy, request.tokens
        assert tokens is not None
        elements, beams, vocab = logits.shape
        raw = logits.reshape(elements * beams, vocab)
        scored = self._penalize(request, raw) if request._counts is not None else raw
        lengths = [len(request.prompt)] * elements
        new_tokens, source = strategy.forward(scored.view(elements, beams, vocab), tokens, lengths)
        request.tokens = new_tokens
        request.steps += 1
        g, rows = request._group, request._rows
        if source is not None:  # beam search: each new beam continues a source beam's rows
            sources = source.flatten().tolist()
            self.rows.fork(g, rows, [rows[s] for s in sources])
            if request._counts is not None:
                request._counts = request._counts[source.flatten().to(self.device)]
        last = new_tokens[:, :, -1].reshape(-1)  # [rows]
        if request._counts is not None:
            live = last >= 0
            request._counts[live.nonzero().flatten(), last[live]] += 1
        if request.logprobs is not None and isinstance(strategy_of(request), BaseStrategy):
            self._record_logprobs(request, raw, last)
        self._check_stop_strings(request)
        if request.on_step is not None:
            request.on_step(request)
        if (
            strategy.is_done
            or request.steps >= request.max_new_tokens
            or all(s is not None for s in request._stopped)
        ):
            self._complete(request)

    def _record_logprobs(self, request: Request, raw: Tensor, last: Tensor) -> None:
        logprobs = F.log_softmax(raw.float(), dim=-1)  # [rows, V]
        k = request.logprobs or 0
        chosen = logprobs.gather(1, last.clamp(min=0)[:, None]).flatten().tolist()
        top = torch.topk(logprobs, k, dim=-1) if k else None
        for r, token in enumerate(last.tolist()):
            if token < 0 or request._stopped[r] is not None:
                continue
            alternatives = []
            if top is not None:
                alternatives = list(zip(top.indices[r].tolist(), top.values[r].tolist(), strict=True))
            request._logprobs[r].append(TokenLogprobs(token, chosen[r], alternatives))

    def _check_stop_strings(self, request: Request) -> None:
        if not request.stop_strings or isinstance(strategy_of(request), BeamSearchStrategy):
            return
        assert self.detokenize is not None
        for r in range(request.width):
            if request._stopped[r] is not None:
                continue
            text = self.detokenize(request.generated(r))
            hits = [text.find(s) for s in request.stop_strings if s in text]
            if hits:
                request._stopped[r] = text[: min(hits)]

    def _complete(self, request: Request) -> None:
        tokens = request.tokens
        assert tokens is not None
        results = request.strategy.finalize(tokens)  # per element, its beams, prompt included
        n = len(request.prompt)
        end = set(strategy_of(request).end_tokens)
        outputs = []
        for r, seq in enumerate(beam for element in results for beam in element):
            ids = list(seq[n:])
            reason = "length"
            if ids and ids[-1] in end:
                ids, reason = ids[:-1], "stop"
            text = None
            stopped = request._stopped[r] if r < len(request._stopped) else None
            if stopped is not None:
                text, reason = stopped, "stop"
                kept = len(ids)
                while kept > 0 and self.detokenize(ids[: kept - 1]).startswith(stopped):  # type: ignore[misc]
                    kept -= 1
                ids = ids[:kept]
            elif request.stop_strings and self.detokenize is not None:  # beam search: cut afterwards
                full = self.detokenize(ids)
                hits = [full.find(s) for s in request.stop_strings if s in full]
                text = full[: min(hits)] if hits else full
                reason = "stop" if hits else reason
            logprobs = None
            if request.logprobs is not None and isinstance(strategy_of(request), BaseStrategy):
                logprobs = request._logprobs[r][: len(ids)]
            outputs.append(Output(ids, reason, logprobs, text))
        self._release(request)
        self._finish(request, outputs)

    def _release(self, request: Request) -> None:
        if request._rows:
            self.rows.clear(request._group, request._rows)
            self._free[request._group] = sorted(self._free[request._group] + request._rows)
            request._rows = []

    def _finish(self, request: Request, outputs: list[Output]) -> None:
        if request in self.running:  # before the caller hears of it: it holds no rows any more
            self.running.remove(request)
        request.outputs = outputs
        if request.on_finish is not None:
            request.on_finish(request)

    # ---- the step

    def step(self) -> None:
        """Admit what fits, then one decode step for every running request."""
        for request in [r for r in self.running if r.cancelled]:
            self._release(request)
            self._finish(request, [])
        self._admit()
        if not self.running:
            return
        rows = self.rows
        tokens = torch.zeros(rows.groups, rows.width, dtype=torch.long)
        positions = torch.zeros(rows.groups, rows.width, dtype=torch.long)
        columns = torch.zeros(rows.groups, rows.width, dtype=torch.long)
        for request in self.running:
            assert request.tokens is not None
            j = request.steps - 1  # index of the generated token fed now
            g, rows_of = request._group, request._rows
            tokens[g, rows_of] = request.tokens[:, :, -1].reshape(-1).clamp(min=0).cpu()  # finished: -1
            positions[g, rows_of] = generated_position(len(request.prompt), request.mask_position, j)
            columns[g, rows_of] = len(request.prompt) + j
        logits = rows.decode_one_token(
            tokens.to(self.device), positions.to(self.device), columns.to(self.device)
        )
        for request in list(self.running):
            strategy = request.strategy
            view = logits[request._group, request._rows].view(strategy.batch_size, strategy.num_beams, -1)
            try:
                self._advance(request, view)
            except Exception as error:
                request.error = error
                self._release(request)
                self._finish(request, [])

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit requests and step until all are done (the synchronous use)."""
        for request in requests:
            self.submit(request)
        while any(not r.done for r in requests):
            self.step()
        for request in requests:
            if request.error is not None:
                raise request.error
        return list(requests)


def strategy_of(request: Request) -> Strategy:
    """The request's own strategy (unwrapped from the tensor-parallel synchronisation)."""
    return getattr(request.strategy, "strategy", request.strategy)


def generated_position(prompt_length: int, mask_position: int | None, j: int) -> int:
    """The position id of the j-th generated token: linear after the prompt for [gMASK], the mask's own
    position for [MASK]/[sMASK]."""
    return prompt_length + j if mask_position is None else mask_position
