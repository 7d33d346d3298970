"""An OpenAI-compatible HTTP server over the decoding engine: `python -m glm.serve --help` (`glm-serve`).

Endpoints: `POST /v1/completions` (OpenAI's legacy completions: prompt text with `[MASK]`/`[sMASK]`/`[gMASK]`,
`[gMASK]` appended when it has none; the completion fills the first blank of the highest-priority kind),
`POST /v1/fill` (this project's blank filling: every blank, each returned), `GET /v1/models`, `GET /health`.
Every decode step batches all running requests (continuous batching: a request joins at the next step and
leaves when done). A full queue answers 429, a bad request 400 naming the field, a missing or wrong key 401
(with --api-key); a client that disconnects frees its rows; SIGTERM lets in-flight requests finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves the handlers' annotations here

from glm.api import ArgumentParser, add_model_arguments, load_from_args, run_cli

if TYPE_CHECKING:
    from fastapi import FastAPI

    from glm.decoding.engine import Engine
    from glm.decoding.requests import Output, Request
    from glm.tokenizer import GLMTokenizer

log = logging.getLogger("glm.serve")
MAX_STOP = 4
MAX_LOGPROBS = 20
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "") -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.kind = kind or ERROR_TYPES.get(status, "server_error")


def error_body(error: BadRequest) -> dict[str, Any]:
    return {
        "error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}
    }


# ------------------------------------------------------------------------------------- request parameters


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind}, got {json.dumps(value)}", name)
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def parse_params(body: dict, width: int, max_length: int) -> dict[str, Any]:
    """The sampling fields of a completion or fill request, checked (BadRequest names the bad field)."""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {json.dumps(seed)}", "seed")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    params = {
        "max_tokens": _number(body, "max_tokens", 16, 1, max_length - 2, integer=True),
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": _number(body, "top_k", 0, 0, 1 << 30, integer=True),
        "n": _number(body, "n", 1, 1, width, integer=True),
        "num_beams": _number(body, "num_beams", 1, 1, width, integer=True),
        "length_penalty": _number(body, "length_penalty", 1.0, -10.0, 10.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.01, 100.0),
        "stop": tuple(stop),
        "seed": seed,
        "logprobs": logprobs,
        "echo": _flag(body, "echo"),
        "stream": _flag(body, "stream"),
        "ignore_eos": _flag(body, "ignore_eos"),
    }
    if params["num_beams"] > 1 and params["n"] > 1:
        raise BadRequest("'n' must be 1 with beam search (num_beams > 1): all beams share one prompt", "n")
    if params["num_beams"] > 1 and params["logprobs"] is not None:
        raise BadRequest("'logprobs' is not available with beam search (num_beams > 1)", "logprobs")
    return params


def parse_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
    return prompts


# ------------------------------------------------------------------------------------------- the service


class Service:
    """The engine on its own thread, and the translation of HTTP requests into engine requests.

    HTTP handlers `submit` and `cancel`; the engine thread applies both between steps. Under tensor
    parallelism (rank 0 serves HTTP, every rank runs the engine) rank 0 broadcasts, before every step,
    the requests that join and those cancelled, and the other ranks (`follow`) apply the same before the
    same step; each token is then decided by rank 0 (glm.distributed.synchronized).
    """

    def __init__(self, engine: Engine, tokenizer: GLMTokenizer, model_name: str, max_queue: int = 0) -> None:
        from glm import distributed

        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_queue = max_queue
        masks = sorted(tokenizer.mask_ids.values())
        self.invalid = [slice(masks[0], masks[-1] + 1), slice(tokenizer.vocab_size, None)]
        self.end_tokens = [tokenizer.eop_id, tokenizer.eos_id]
        self.distributed = distributed.current().tensor_parallel_size > 1
        self._lock = threading.Lock()
        self._incoming: list[Request] = []
        self._cancelled: list[Request] = []
        self._specs: dict[Request, tuple] = {}  # what the other ranks need to build the same request
        self._wake = threading.Event()
        self._stop = False
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
        from glm import distributed

        uid: dict[Request, int] = {}
        while True:
            incoming, cancelled = self._plan()
            stop = self._stop and not incoming and not self.engine.busy
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
            except Exception as error:  # the model failed: fail what runs, keep serving
                log.exception("decode step failed")
                for request in list(self.engine.running):
                    request.error = error
                    self.engine.cancel(request)
            for request in incoming:
                self._specs.pop(request, None)

    def _apply(self, incoming: list[Request], cancelled: list[Request]) -> None:
        for request in incoming:
            self.engine.submit(request)
        for request in cancelled:
            self.engine.cancel(request)

    def follow(self) -> None:
        """The engine loop of a tensor-parallel rank other than 0: rank 0's plan, then the same step."""
        from glm import distributed

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
        import torch

        from glm.decoding.requests import Penalties, Request
        from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy

        if params["seed"] is None:  # a request of its own, independent of its neighbours
            params = {**params, "seed": secrets.randbits(63)}
        seed = params["seed"]
        generator = torch.Generator(self.engine.device).manual_seed(seed % 2**64)
        if params["num_beams"] > 1:
            strategy: Any = BeamSearchStrategy(
                1,
                params["num_beams"],
                length_penalty=params["length_penalty"],
                consider_end=True,
                end_tokens=[] if params["ignore_eos"] else self.end_tokens,
                invalid_slices=self.invalid,
                deterministic=params["temperature"] == 0,
                generator=generator,
            )
        else:
            greedy = params["temperature"] == 0
            strategy = BaseStrategy(
                params["n"],
                invalid_slices=self.invalid,
                temperature=1.0 if greedy else params["temperature"],
                top_k=1 if greedy else params["top_k"],
                top_p=0.0 if greedy or params["top_p"] >= 1.0 else params["top_p"],
                end_tokens=[] if params["ignore_eos"] else self.end_tokens,
                generator=generator,
            )
        penalties = Penalties(
            params["repetition_penalty"], params["presence_penalty"], params["frequency_penalty"]
        )
        request = Request(
            [*prompt_ids, self.tokenizer.sop_id],
            strategy,
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


class Watch:
    """An engine request seen from asyncio: snapshots of its rows after each step, then its outputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streaming: bool) -> None:
        self.loop = loop
        self.streaming = streaming
        self.updates: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_step(self, request: Request) -> None:  # engine thread
        if self.streaming:
            from glm.decoding.strategies import BeamSearchStrategy

            beam = isinstance(getattr(request.strategy, "strategy", request.strategy), BeamSearchStrategy)
            rows = [request.settled()] if beam else [request.generated(r) for r in range(request.width)]
            self.loop.call_soon_threadsafe(self.updates.put_nowait, ("step", (request.tag, rows)))

    def on_finish(self, request: Request) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.updates.put_nowait, ("done", request))


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from glm.decoding.infill import Answer, prepare_query

    tokenizer = service.tokenizer
    engine = service.engine

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:  # after uvicorn has let the in-flight requests finish
            service.stop()

    app = FastAPI(title="glm130b-py", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def bad_request(_: HTTPRequest, error: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status)

    async def read_body(http: HTTPRequest) -> dict:
        if api_key is not None:
            given = http.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise BadRequest("a valid API key is needed: send 'Authorization: Bearer <key>'", None, 401)
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != service.model_name:
            message = f"model '{model}' does not exist; this server has '{service.model_name}'"
            raise BadRequest(message, "model", 404)
        return body

    def check_length(ids: list[int], params: dict) -> None:
        total = len(ids) + 1 + params["max_tokens"]
        if total > engine.rows.max_length:
            raise BadRequest(
                f"the prompt ({len(ids) + 1} tokens with sop) + max_tokens {params['max_tokens']} = {total} "
                f"exceeds this server's {engine.rows.max_length} positions: shorten the prompt or lower "
                "max_tokens",
                "max_tokens",
            )

    async def wait(
        http: HTTPRequest, watch: Watch, requests: list[Request]
    ) -> AsyncIterator[tuple[str, Any]]:
        """Updates of the requests until all are done; cancels them if the client goes away."""
        pending = len(requests)
        try:
            while pending:
                try:
                    kind, value = await asyncio.wait_for(watch.updates.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if kind == "done":
                    pending -= 1
                yield kind, value
        finally:
            for request in requests:
                if not request.done:
                    service.cancel(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "glm130b-py"}
        return {"object": "list", "data": [card]}

    def token_logprobs(output: Output, offset: int) -> dict:
        """OpenAI's legacy log-probs; a token's text is what it adds to the decoded text before it (so the
        tokens add up to the completion, spaces included); the alternatives are decoded alone."""
        tokens, values, tops, offsets = [], [], [], []
        entries = output.logprobs or []
        decoded = ""
        for k, entry in enumerate(entries):
            text = tokenizer.detokenize([e.token for e in entries[: k + 1]])
            tokens.append(
                text[len(decoded) :] if text.startswith(decoded) else tokenizer.detokenize([entry.token])
            )
            decoded = text
            values.append(entry.logprob)
            tops.append({tokenizer.detokenize([t]): lp for t, lp in entry.top})
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def output_text(output: Output) -> str:
        return output.text if output.text is not None else tokenizer.detokenize(output.ids)

    @app.post("/v1/completions", response_model=None)
    async def completions(http: HTTPRequest) -> Any:
        body = await read_body(http)
        prompts = parse_prompts(body)
        params = parse_params(body, engine.rows.width, engine.rows.max_length)
        queries = [prepare_query(p, tokenizer) for p in prompts]
        for query in queries:
            check_length(query.ids, params)
        loop = asyncio.get_running_loop()
        watch = Watch(loop, params["stream"])
        requests = []
        for query in queries:
            position = None if query.use_gmask else query.ids.index(query.mask_id)
            request = service.make_request(
                query.ids, position, params, params["max_tokens"], watch.on_step, watch.on_finish
            )
            request.tag = len(requests)
            requests.append(request)
        for request in requests:
            try:
                service.submit(request)
            except BadRequest:
                for submitted in requests:
                    service.cancel(submitted)
                raise
        n = requests[0].width if params["num_beams"] == 1 else 1
        created = int(time.time())
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name}
        echo = [p if params["echo"] else "" for p in prompts]

        def finish(request: Request) -> list[dict]:
            if request.error is not None:
                raise BadRequest(f"generation failed: {request.error}", None, 500)
            choices = []
            outputs = (request.outputs or [])[:n]
            for j, output in enumerate(outputs):
                prefix = echo[request.tag]
                logprobs = None
                if params["logprobs"] is not None:
                    logprobs = token_logprobs(output, len(prefix))
                choices.append(
                    {
                        "text": prefix + output_text(output),
                        "index": request.tag * n + j,
                        "logprobs": logprobs,
                        "finish_reason": output.finish_reason,
                    }
                )
            return choices

        if not params["stream"]:
            async for _ in wait(http, watch, requests):
                pass
            choices = sorted((c for r in requests for c in finish(r)), key=lambda c: c["index"])
            completion = sum(len(o.ids) for r in requests for o in (r.outputs or [])[:n])
            prompt_tokens = sum(len(r.prompt) for r in requests)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }
            return {**head, "choices": choices, "usage": usage}

        hold = max((len(s) for s in params["stop"]), default=1) - 1  # a stop string may be forming

        async def stream() -> AsyncIterator[str]:
            """Deltas after every step, held back at incomplete characters and where a stop string may be
            forming; the rest with the finish reason (and log-probs) when a prompt is done."""
            sent = {(r.tag, j): "" for r in requests for j in range(n)}

            def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: Any = None) -> str:
                choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
                return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

            if params["echo"]:
                for request in requests:
                    for j in range(n):
                        yield chunk(request.tag * n + j, echo[request.tag])
            async for kind, value in wait(http, watch, requests):
                if kind == "step":
                    tag, rows = value
                    for j, ids in enumerate(rows[:n]):
                        text = tokenizer.detokenize(ids).rstrip("\ufffd")
                        text = text[: max(len(text) - hold, 0)]
                        key = (tag, j)
                        if len(text) > len(sent[key]) and text.startswith(sent[key]):
                            yield chunk(tag * n + j, text[len(sent[key]) :])
                            sent[key] = text
                    continue
                for j, output in enumerate(finish(value)):
                    key = (value.tag, j)
                    text = output["text"][len(echo[value.tag]) :]
                    rest = text[len(sent[key]) :] if text.startswith(sent[key]) else text
                    yield chunk(output["index"], rest, output["finish_reason"], output["logprobs"])
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/fill")
    async def fill(http: HTTPRequest) -> dict:
        """Fill every blank of one prompt, left to right (each blank of `max_tokens` at most)."""
        body = await read_body(http)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        params = parse_params(body, engine.rows.width, engine.rows.max_length)
        if params["stream"] or params["n"] > 1:
            raise BadRequest(
                "'stream' and 'n' > 1 are for /v1/completions", "stream" if params["stream"] else "n"
            )
        query = prepare_query(prompt, tokenizer)
        answer = Answer(query.ids, unfilled=query.unfilled)
        loop = asyncio.get_running_loop()
        while query.mask_id in answer.ids:
            position = answer.ids.index(query.mask_id)
            check_length(answer.ids, params)
            watch = Watch(loop, False)
            request = service.make_request(
                answer.ids,
                None if query.use_gmask else position,
                params,
                params["max_tokens"],
                None,
                watch.on_finish,
            )
            service.submit(request)
            async for _ in wait(http, watch, [request]):
                pass
            if request.error is not None:
                raise BadRequest(f"generation failed: {request.error}", None, 500)
            ids = request.outputs[0].ids if request.outputs else []
            answer = answer.fill(position, ids)
        if answer.ids and answer.ids[-1] == tokenizer.eos_id:
            answer.ids.pop()
        return {
            "object": "fill",
            "model": service.model_name,
            "text": answer.text(tokenizer),
            "blanks": answer.blanks(tokenizer),
        }

    return app


# -------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="glm-serve", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="TCP port")
    server.add_argument(
        "--model-name", help="the model id clients send (default: the checkpoint's folder name)"
    )
    server.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: the GLM_API_KEY environment variable, else none)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument("--groups", type=int, default=4, help="row groups of the KV cache")
    engine.add_argument("--width", type=int, default=4, help="rows per group: the largest n or num_beams")
    engine.add_argument("--max-length", type=int, help="positions per row (default: the model's maximum)")
    engine.add_argument("--max-queue", type=int, default=64, help="requests waiting for rows before 429")
    engine.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    engine.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (GPU)")
    return parser


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from glm import distributed
    from glm.decoding.engine import Engine

    for name in ("groups", "width", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    parallel = distributed.current()
    if parallel.data_parallel_size > 1:
        raise ValueError("glm-serve runs one model replica: launch tensor-parallel-size processes")
    model, tokenizer = load_from_args(args)
    max_length = args.max_length or model.config.max_sequence_length
    if not 2 < max_length <= model.config.max_sequence_length:
        raise ValueError(f"--max-length must be in 3..{model.config.max_sequence_length}, got {max_length}")
    engine = Engine(
        model,
        groups=args.groups,
        width=args.width,
        max_length=max_length,
        detokenize=tokenizer.detokenize,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
    )
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    service = Service(engine, tokenizer, name, max_queue=args.max_queue)
    if not parallel.is_main:  # rank 0 serves HTTP; the others run the same steps
        service.follow()
        return 0
    app = create_app(service, api_key=args.api_key or os.environ.get("GLM_API_KEY"))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=600)
    return 0


def cli() -> None:
    run_cli(main, build_parser().parse_args())


if __name__ == "__main__":
    cli()
