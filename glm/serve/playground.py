"""The playground: a static page at `/` (glm/serve/static, shipped as package data, nothing fetched at run
time) that talks to /v1/completions, and `GET /playground/limits`, the bounds its inputs take from the
server (the same bounds glm.serve.protocol.parse_params enforces; tests/test_chat.py checks both agree)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import Response

from glm.serve.protocol import MAX_LOGPROBS, MAX_STOP, BadRequest

if TYPE_CHECKING:
    from glm.serve.service import Service

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}


def limits(width: int, max_length: int) -> dict[str, Any]:
    """The inclusive [low, high] of each numeric field parse_params checks, for a server of `width` rows per
    group and `max_length` positions per row."""
    return {
        "max_tokens": [1, max_length - 2],
        "temperature": [0.0, 2.0],
        "top_p": [0.0, 1.0],
        "top_k": [0, 1 << 30],
        "n": [1, width],
        "num_beams": [1, width],
        "length_penalty": [-10.0, 10.0],
        "logprobs": [0, MAX_LOGPROBS],
        "stop": [0, MAX_STOP],
    }


def static_file(name: str) -> Response:
    if name not in STATIC:
        raise BadRequest(f"no file '{name}' in the playground: it has {', '.join(STATIC)}", None, 404)
    data = resources.files("glm.serve").joinpath("static", name).read_bytes()
    return Response(data, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


def add_routes(app: FastAPI, service: Service, api_key_required: bool) -> None:
    engine = service.engine

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return static_file("index.html")

    @app.get("/playground/limits")  # before the files' route, which would match it too
    async def playground_limits() -> dict:
        return {
            "model": service.model_name,
            "api_key_required": api_key_required,
            "limits": limits(engine.rows.width, engine.rows.max_length),
        }

    @app.get("/playground/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return static_file(name)
