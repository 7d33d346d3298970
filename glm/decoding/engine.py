"""The decoding engine: continuous batching of requests over the rows (glm.decoding.rows).

A request joins at the next step and leaves when it is done. The prompts joining at one step are prefilled
together; each step feeds one token per row of every running request and lets each request's strategy
choose its next tokens.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from glm.decoding.requests import Output, QueueFull, Request, TokenLogprobs, strategy_of
from glm.decoding.rows import MAX_PREFILL_TOKENS, Prompt, Rows
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.distributed import current, synchronized
from glm.model import GLM
from glm.query import PAD_TOKEN, context_inputs, generated_position


class Engine:
    """Continuous batching over a Rows pool: `submit` requests from any thread, `step` from one.

    Each step admits waiting requests that fit (first come first served; a request needs `width` rows of
    one group, a batch that many in one group per element, and `prompt + max_new_tokens` positions) and
    prefills them together (at most `max_prefill_tokens` padded tokens per forward), runs one decode step
    for every running request and retires those that are done. `detokenize` is needed for stop strings.
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
        if request.prompts:
            self._check_batch(request)
        elif isinstance(request.strategy, BeamSearchStrategy) and request.strategy.batch_size != 1:
            raise ValueError("a beam-search request holds one prompt: strategy batch_size must be 1")
        if not all(prompt for prompt, _ in request.elements):
            raise ValueError("the prompt is empty: it needs at least the sop token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        total = request.offset + request.max_new_tokens
        if total > self.rows.max_length:
            raise ValueError(
                f"prompt {request.offset} + max_new_tokens {request.max_new_tokens} = {total} tokens "
                f"exceeds the engine's {self.rows.max_length} positions"
            )
        if request.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need an engine with detokenize")

    def _check_batch(self, request: Request) -> None:
        if len(request.prompts) != request.strategy.batch_size:
            raise ValueError(
                f"{len(request.prompts)} prompts for a strategy of batch size {request.strategy.batch_size}"
            )
        if len(request.prompts) > self.rows.groups:
            raise ValueError(
                f"a batch of {len(request.prompts)} needs as many groups; this engine has {self.rows.groups}"
            )
        if request.penalties.active or request.stop_strings or request.logprobs is not None:
            raise ValueError("a batch takes no penalties, stop strings or log-probs")

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
    def cudagraph_skips(self) -> int:
        """CUDA-graph captures torch.compile skipped for the decode step (with cuda_graphs; 0 otherwise)."""
        return self.rows.cudagraph_skips

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
            count, width = len(request.prompts) or 1, request.width
            groups = [g for g, free in enumerate(self._free) if len(free) >= width][:count]
            if len(groups) < count:
                break
            with self._lock:
                self.waiting.popleft()
            for g in groups:
                rows, self._free[g] = self._free[g][:width], self._free[g][width:]
                request._places.append((g, rows))
            taken.append(request)
        return taken

    def _prefill(self, requests: list[Request]) -> list[list[Tensor] | Exception]:
        """Each request's next-token logits [places, V] after its prompts, each prefilled into the first row
        of its place: together, or, if that fails, request by request, so that only a bad one gets its
        error."""
        prompts = [self._prompts(r) for r in requests]
        try:
            logits = self.rows.prefill_many(
                [p for own in prompts for p in own], max_tokens=self.max_prefill_tokens
            )
            ends = itertools.accumulate(len(own) for own in prompts)
            return [logits[end - len(own) : end] for own, end in zip(prompts, ends, strict=True)]
        except Exception as error:
            if current().tensor_parallel_size > 1:
                raise  # the other ranks may be waiting inside this forward: no rank may go on alone
            if len(prompts) == 1:
                return [error]
        results: list[list[Tensor] | Exception] = []  # the batch failed: isolate the bad request
        for own in prompts:
            try:
                results.append(self.rows.prefill_many(own, max_tokens=self.max_prefill_tokens))
            except Exception as error:
                results.append(error)
        return results

    def _prompts(self, request: Request) -> list[Prompt]:
        """The request's prompts, one per place (a batch's elements, or the prompt its rows share)."""
        return [
            Prompt(g, rows[0], prompt, *context_inputs(len(prompt), mask_position, request.unidirectional))
            for (g, rows), (prompt, mask_position) in placed(request)
        ]

    def _start(self, request: Request, logits: list[Tensor]) -> None:
        """Start a request from its prefilled prompts' logits [V] per place: the rows of a place share its
        prompt; first token."""
        request.strategy = synchronized(request.strategy)  # tensor parallel: rank 0 decides
        for g, rows in request._places:
            self.rows.fork(g, rows, [rows[0]] * len(rows))
        elements, offset = request.strategy.batch_size, request.offset
        tokens = torch.full((elements, 1, offset), PAD_TOKEN, dtype=torch.long)  # [n, 1, L], left-padded
        for e, (prompt, _) in enumerate(request.elements):
            tokens[e, 0, offset - len(prompt) :] = torch.tensor(prompt)
        request.tokens = tokens.to(self.device)
        rows = elements * request.strategy.num_beams
        request._logprobs = [[] for _ in range(rows)]
        request._stopped = [None] * rows
        if request.penalties.active:
            request._counts = torch.zeros(rows, logits[0].shape[-1], device=self.device)
        self._advance(request, torch.stack(logits)[:, None].expand(elements, 1, -1))

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
        lengths = [len(prompt) for prompt, _ in request.elements]
        new_tokens, source = strategy.forward(scored.view(elements, beams, vocab), tokens, lengths)
        request.tokens = new_tokens
        request.steps += 1
        if source is not None:  # beam search: each new beam continues a source beam's rows
            for (g, rows), sources in zip(request._places, source.tolist(), strict=True):
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
        request.beams = request.strategy.finalize(tokens)  # per element, its beams, prompt included
        n = request.offset
        end = set(strategy_of(request).end_tokens)
        outputs = []
        for r, seq in enumerate(beam for element in request.beams for beam in element):
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
        for g, rows in request._places:
            self.rows.clear(g, rows)
            self._free[g] = sorted(self._free[g] + rows)
        request._places = []

    def _finish(self, request: Request, outputs: list[Output]) -> None:
        if request in self.running:  # before the caller hears of it: it holds no rows any more
            self.running.remove(request)
        request.outputs = outputs
        if request.on_finish is not None:
            request.on_finish(request)

    def fail_all(self, error: Exception) -> None:
        """Finish every running and waiting request with `error`, without another step (the model can no
        longer run: a tensor-parallel step failed)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in [*self.running, *waiting]:
            request.error = error
            self._release(request)
            self._finish(request, [])

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
            last = request.tokens[:, :, -1].reshape(-1).clamp(min=0).cpu()  # finished: -1
            for (g, slots), (prompt, mask_position) in placed(request):
                tokens[g, slots], last = last[: len(slots)], last[len(slots) :]
                positions[g, slots] = generated_position(len(prompt), mask_position, j)
                columns[g, slots] = len(prompt) + j
        logits = rows.decode_one_token(
            tokens.to(self.device), positions.to(self.device), columns.to(self.device)
        )
        for request in list(self.running):
            strategy = request.strategy
            view = torch.cat([logits[g, slots] for g, slots in request._places])
            view = view.view(strategy.batch_size, strategy.num_beams, -1)
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


def placed(request: Request) -> list[tuple[tuple[int, list[int]], tuple[list[int], int | None]]]:
    """Each place (group, rows) of an admitted request with the prompt and mask position of its rows."""
    elements = request.elements if request.prompts else request.elements[:1]
    return list(zip(request._places, elements, strict=True))
