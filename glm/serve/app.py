"""The HTTP routes: each parses its request (glm.serve.protocol) and hands it to the service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from glm.serve import chat, playground
from glm.serve.echo import echo_body, echo_logprobs, prompt_text
from glm.serve.protocol import (
    BadRequest,
    Completion,
    error_body,
    fill_body,
    models_body,
    parse_body,
    parse_fill,
    parse_params,
    parse_prompts,
)
from glm.serve.service import Service
from glm.serve.tokenize import add_tokenizer_routes


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
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
        authorization = http.headers.get("authorization", "")
        return parse_body(await http.body(), authorization, api_key, service.model_name)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models() -> dict:
        return models_body(service.model_name)

    @app.post("/v1/completions", response_model=None)
    async def completions(http: HTTPRequest) -> Any:
        body = await read_body(http)
        prompts = parse_prompts(body, service.tokenizer.vocab_size)
        params = parse_params(body, engine.rows.width, engine.rows.max_length)
        texts = [prompt_text(service.tokenizer, p) for p in prompts]
        scored = await echo_logprobs(
            service.tokenizer, service.score, engine.rows.max_length, prompts, params
        )
        if params["max_tokens"] == 0:  # the prompts scored (or echoed) alone
            return echo_body(service.tokenizer, service.model_name, prompts, texts, scored, params["n"])
        watch, requests = service.submit_completions(prompts, params)
        completion = Completion(service.tokenizer, service.model_name, texts, params, requests, scored)
        if not params["stream"]:
            async for _ in service.wait(http.is_disconnected, watch, requests):
                pass
            return completion.body()
        updates = service.wait(http.is_disconnected, watch, requests)
        return StreamingResponse(completion.stream(updates), media_type="text/event-stream")

    add_tokenizer_routes(app, service.tokenizer, engine.rows.max_length, read_body)

    @app.post("/v1/fill")
    async def fill(http: HTTPRequest) -> dict:
        """Fill every blank of one prompt, left to right (each blank of `max_tokens` at most)."""
        prompt, params = parse_fill(await read_body(http), engine.rows.width, engine.rows.max_length)
        answer = await service.fill(prompt, params, http.is_disconnected)
        return fill_body(service.tokenizer, service.model_name, answer)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http: HTTPRequest) -> Any:
        return await chat.chat_completions(service, http, await read_body(http))

    playground.add_routes(app, service, api_key_required=api_key is not None)
    return app
