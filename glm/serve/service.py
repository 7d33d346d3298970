"""The engine on its own thread, and HTTP requests turned into engine requests (one per prompt or blank)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import torch

from glm import distributed
from glm.decoding.engine import Engine
from glm.decoding.factory import banned_tokens, make_strategy
from glm.decoding.infill import Answer, prepare_query
from glm.decoding.options import GenerationOptions
from glm.decoding.requests import Penalties, Request
from glm.decoding.strategies import BeamSearchStrategy
from glm.scoring import PackedRow, TargetScore, score_rows
from glm.serve.echo import Prompt, ids_query
from glm.serve.protocol import BadRequest, check_length, generation_failed
from glm.tokenizer import GLMTokenizer

log = logging.getLogger("glm.serve")


def generation_options(params: dict[str, Any]) -> GenerationOptions:
    """The generation options of a request's parsed fields: temperature 0 is greedy (sampling) or
    deterministic (beam search)."""
    greedy = params["temperature"] == 0
    if params["num_beams"] > 1:
        return GenerationOptions(
            sampling_strategy="BeamSearchStrategy",
            num_beams=params["num_beams"],
            length_penalty=params["length_penalty"],
            no_repeat_ngram_size=0,  # the options' default is the original CLI's 3; the server bans none
            deterministic=greedy,
        )
    return GenerationOptions(
        temperature=1.0 if greedy else params["temperature"],
        top_k=1 if greedy else params["top_k"],
        top_p=0.0 if greedy or params["top_p"] >= 1.0 else params["top_p"],
    )


class Service:
    """The engine on its own thread, and the translation of HTTP requests into engine requests.

    HTTP handlers `submit` and `cancel`; the engine thread applies both between steps. Under tensor
    parallelism (rank 0 serves HTTP, every rank runs the engine) rank 0 broadcasts, before every step,
    the requests that join and those cancelled, and the other ranks (`follow`) apply the same before the
    same step; each token is then decided by rank 0 (glm.distributed.synchronized).
    """

    def __init__(self, engine: Engine, tokenizer: GLMTokenizer, model_name: str, max_queue: int = 0) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_queue = max_queue
        self.invalid = banned_tokens(tokenizer)
        self.end_tokens = [tokenizer.eop_id, tokenizer.eos_id]
        self.distributed = distributed.current().tensor_parallel_size > 1
        self._lock = threading.Lock()
        self._incoming: list[Request] = []
        self._cancelled: list[Request] = []
        self._specs: dict[Request, tuple] = {}  # what the other ranks need to build the same request
        self._scoring: list[ScoreJob] = []  # echoed prompts to score, between decode steps
        self._wake = threading.Event()
        self._stop = False
        # An engine loop that fails stops the server (under tensor parallelism the other ranks may be
        # waiting inside the step that failed): the error, and what stops the HTTP server.
        self.failure: Exception | None = None
        self.on_failure: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._loop, name="glm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=600)

    def _plan(self) -> tuple[list[Request], list[Request]]:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, []
        return incoming, cancelled

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as error:  # under tensor parallelism a step or the plan's broadcast (a lost rank)
            self._fail(error)

    def _serve(self) -> None:
        uid: dict[Request, int] = {}
        while True:
            incoming, cancelled = self._plan()
            with self._lock:
                scoring, self._scoring = self._scoring, []
            self._score(scoring)  # never under tensor parallelism (Service.score)
            stop = self._stop and not incoming and not self.engine.busy and not self._scoring
            if not (incoming or cancelled or self.engine.busy or stop):
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            if self.distributed:  # the same plan on every rank, before the same step
                for request in [r for r in uid if r.done]:
                    del uid[request]
                for request in incoming:
                    uid[request] = len(uid)
                specs = [(uid[r], *self._specs[r]) for r in incoming]
                distributed.broadcast_object((specs, [uid[r] for r in cancelled if r in uid], stop))
            if stop:
                return
            self._apply(incoming, cancelled)
            try:
                self.engine.step()
            except Exception as error:
                if self.distributed:
                    raise  # the other ranks may be waiting anywhere inside this step: the job stops
                log.exception("decode step failed")  # fail what runs, keep serving
                for request in list(self.engine.running):
                    request.error = error
                    self.engine.cancel(request)
            for request in incoming:
                self._specs.pop(request, None)

    def _score(self, jobs: list[ScoreJob]) -> None:
        """Score the rows of every job, as many rows per forward pass as the prefill budget allows; a job
        that fails gets its error (500), the others their scores."""
        rows = [(job, row) for job in jobs for row in job.rows]
        top_k = max((job.top_k for job in jobs), default=0)
        scores: dict[ScoreJob, list] = {job: [] for job in jobs}
        budget = self.engine.max_prefill_tokens
        while rows:
            batch = [rows.pop(0)]
            longest = len(batch[0][1].tokens)
            while rows and (len(batch) + 1) * max(longest, len(rows[0][1].tokens)) <= budget:
                longest = max(longest, len(rows[0][1].tokens))
                batch.append(rows.pop(0))
            try:
                results = score_rows(self.engine.rows.model, [row for _, row in batch], top_k)
            except Exception as error:
                log.exception("scoring failed")
                for job in {job for job, _ in batch}:
                    job.finish(error)
                    scores.pop(job, None)
                rows = [(job, row) for job, row in rows if job in scores]
                continue
            for (job, _), result in zip(batch, results, strict=True):
                if job in scores:
                    scores[job].append(result[0])
        for job, result in scores.items():
            job.finish(result)

    async def score(self, rows: list[PackedRow], top_k: int) -> list[TargetScore]:
        """The one target of each row, scored on the engine thread between decode steps (batched with
        other requests' rows)."""
        if not rows:
            return []
        if self.distributed:
            raise BadRequest("echoed prompts are not scored under tensor parallelism yet", "echo")
        job = ScoreJob(rows, top_k, asyncio.get_running_loop())
        with self._lock:
            if self.failure is not None:
                raise BadRequest(f"the server is stopping: the engine failed ({self.failure})", None, 503)
            self._scoring.append(job)
        self._wake.set()
        result = await job.future
        if isinstance(result, Exception):
            raise BadRequest(f"scoring failed: {result}", None, 500)
        return result

    def _fail(self, error: Exception) -> None:
        """The engine loop cannot go on: every request fails (their clients hear first), every other rank
        is told to exit, the server stops."""
        log.exception("the engine failed: the server stops")
        with self._lock:
            self.failure = error
            incoming, self._incoming = self._incoming, []
        self.engine.fail_all(error)
        for request in incoming:  # not handed to the engine yet
            request.error, request.outputs = error, []
            if request.on_finish is not None:
                request.on_finish(request)
        distributed.stop_job(f"the engine failed: {type(error).__name__}: {error}")
        self.on_failure()

    def _apply(self, incoming: list[Request], cancelled: list[Request]) -> None:
        for request in incoming:
            self.engine.submit(request)
        for request in cancelled:
            self.engine.cancel(request)

    def follow(self) -> None:
        """The engine loop of a tensor-parallel rank other than 0: rank 0's plan, then the same step."""
        # A stop (SIGTERM to the whole job) is rank 0's to decide: it lets in-flight requests finish, then
        # tells every rank to stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requests: dict[int, Request] = {}
        while True:
            specs, cancelled, stop = distributed.broadcast_object(None)
            if stop:
                return
            incoming = []
            for uid, *spec in specs:
                request = self.make_request(
                    *spec, on_step=None, on_finish=lambda r, u=uid: requests.pop(u, None)
                )
                self._specs.pop(request)
                requests[uid] = request
                incoming.append(request)
            self._apply(incoming, [requests[u] for u in cancelled if u in requests])
            self.engine.step()

    def submit(self, request: Request) -> None:
        """Queue a request made by make_request (BadRequest: 429 when the queue is full, 400 if it can never
        run)."""
        try:
            self.engine.check(request)
        except ValueError as error:
            raise BadRequest(str(error), "max_tokens") from None
        with self._lock:
            if self.failure is not None:
                raise BadRequest(f"the server is stopping: the engine failed ({self.failure})", None, 503)
            waiting = len(self.engine.waiting) + len(self._incoming)
            if self.max_queue and waiting >= self.max_queue:
                raise BadRequest(f"the server is busy ({waiting} requests waiting); retry later", None, 429)
            self._incoming.append(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away) and free its rows, at the next step."""
        with self._lock:
            if request in self._incoming:
                self._incoming.remove(request)
                self._specs.pop(request, None)
                request.cancelled = True
                request.outputs = []
                return
            self._cancelled.append(request)
        self._wake.set()

    def make_request(
        self,
        prompt_ids: list[int],
        mask_position: int | None,
        params: dict[str, Any],
        max_tokens: int,
        on_step: Callable[[Request], None] | None,
        on_finish: Callable[[Request], None],
    ) -> Request:
        """The engine request that generates after `prompt_ids` + sop under a request's parsed fields."""
        if params["seed"] is None:  # a request of its own, independent of its neighbours
            params = {**params, "seed": secrets.randbits(63)}
        generator = torch.Generator(self.engine.device).manual_seed(params["seed"] % 2**64)
        options = generation_options(params)
        batch_size = params["n"] if options.sampling_strategy == "BaseStrategy" else 1
        end_tokens = [] if params["ignore_eos"] else self.end_tokens
        penalties = Penalties(
            params["repetition_penalty"], params["presence_penalty"], params["frequency_penalty"]
        )
        request = Request(
            [*prompt_ids, self.tokenizer.sop_id],
            make_strategy(options, batch_size, end_tokens, self.invalid, generator),
            max_tokens,
            mask_position=mask_position,
            stop_strings=params["stop"],
            logprobs=params["logprobs"],
            penalties=penalties,
            on_step=on_step,
            on_finish=on_finish,
        )
        self._specs[request] = (prompt_ids, mask_position, params, max_tokens)
        return request

    def submit_completions(
        self, prompts: list[Prompt], params: dict[str, Any]
    ) -> tuple[Watch, list[Request]]:
        """Queue one request per prompt, text or token ids (the first blank of each, request i tagged i),
        all or none."""
        queries = [
            prepare_query(p, self.tokenizer) if isinstance(p, str) else ids_query(p, self.tokenizer)
            for p in prompts
        ]
        for query in queries:
            check_length(query.ids, params, self.engine.rows.max_length)
        watch = Watch(asyncio.get_running_loop(), params["stream"])
        requests = []
        for query in queries:
            position = None if query.use_gmask else query.ids.index(query.mask_id)
            request = self.make_request(
                query.ids, position, params, params["max_tokens"], watch.on_step, watch.on_finish
            )
            request.tag = len(requests)
            requests.append(request)
        for request in requests:
            try:
                self.submit(request)
            except BadRequest:
                for submitted in requests:
                    self.cancel(submitted)
                raise
        return watch, requests

    async def fill(
        self, prompt: str, params: dict[str, Any], disconnected: Callable[[], Awaitable[bool]]
    ) -> Answer:
        """Fill every blank of `prompt` left to right (glm.decoding.infill's query and answer), each blank one
        request of at most max_tokens conditioned on the blanks before it."""
        query = prepare_query(prompt, self.tokenizer)
        answer = Answer(query.ids, unfilled=query.unfilled)
        while query.mask_id in answer.ids:
            position = answer.ids.index(query.mask_id)
            check_length(answer.ids, params, self.engine.rows.max_length)
            watch = Watch(asyncio.get_running_loop(), False)
            request = self.make_request(
                answer.ids,
                None if query.use_gmask else position,
                params,
                params["max_tokens"],
                None,
                watch.on_finish,
            )
            self.submit(request)
            async for _ in self.wait(disconnected, watch, [request]):
                pass
            generation_failed(request)
            answer = answer.fill(position, request.outputs[0].ids if request.outputs else [])
        if answer.ids and answer.ids[-1] == self.tokenizer.eos_id:
            answer.ids.pop()
        return answer

    async def wait(
        self, disconnected: Callable[[], Awaitable[bool]], watch: Watch, requests: list[Request]
    ) -> AsyncIterator[tuple[str, Any]]:
        """Updates of the requests until all are done; cancels them if the client goes away."""
        pending = len(requests)
        try:
            while pending:
                try:
                    kind, value = await asyncio.wait_for(watch.updates.get(), timeout=0.5)
                except TimeoutError:
                    if await disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if kind == "done":
                    pending -= 1
                yield kind, value
        finally:
            for request in requests:
                if not request.done:
                    self.cancel(request)


class Watch:
    """An engine request seen from asyncio: snapshots of its rows after each step, then its outputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streaming: bool) -> None:
        self.loop = loop
        self.streaming = streaming
        self.updates: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_step(self, request: Request) -> None:  # engine thread
        if self.streaming:
            beam = isinstance(getattr(request.strategy, "strategy", request.strategy), BeamSearchStrategy)
            rows = [request.settled()] if beam else [request.generated(r) for r in range(request.width)]
            self.loop.call_soon_threadsafe(self.updates.put_nowait, ("step", (request.tag, rows)))

    def on_finish(self, request: Request) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.updates.put_nowait, ("done", request))


class ScoreJob:
    """Rows to score on the engine thread, and the future their scores (or the error) are set on."""

    def __init__(self, rows: list[PackedRow], top_k: int, loop: asyncio.AbstractEventLoop) -> None:
        self.rows, self.top_k, self.loop = rows, top_k, loop
        self.future: asyncio.Future[list[TargetScore] | Exception] = loop.create_future()

    def finish(self, result: list[TargetScore] | Exception) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.future.set_result, result)
