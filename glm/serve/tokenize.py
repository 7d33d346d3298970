"""The tokenizer over HTTP, in the shapes vLLM serves (lm-evaluation-harness's `tokenizer_backend=remote`):
`GET /tokenizer_info`, `POST /tokenize` (`{"prompt", "add_special_tokens"}` -> `{"tokens", "count",
"max_model_len"}`) and `POST /detokenize` (`{"tokens"}` -> `{"prompt"}`).

Text is encoded as a query is: `[MASK]`, `[sMASK]` and `[gMASK]` stand for their tokens, and so do the
spellings detokenize writes for `sop`, `eop` and `eos` (`[sop]`, `[eop]`, `[</s>]` with the bundled
model), which /tokenizer_info names the bos, eos and pad tokens. /detokenize writes the masks as a query
does (`[gMASK]`, where the tokenizer's own detokenize writes `[[gMASK]]`), so /tokenize reads its text back
as the same ids. No special token is ever added: `add_special_tokens` is accepted and changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from glm.serve.protocol import BadRequest, check_token_ids
from glm.tokenizer import GLMTokenizer

ReadBody = Callable[[HTTPRequest], Awaitable[dict]]


def _commands(tokenizer: GLMTokenizer) -> dict[str, int]:
    """The written form of the command tokens a text may hold (besides the masks), and their ids."""
    return {tokenizer.detokenize([i]): i for i in (tokenizer.sop_id, tokenizer.eop_id, tokenizer.eos_id)}


def encode(tokenizer: GLMTokenizer, text: str) -> list[int]:
    """The ids of `text` (see the module's doc): what /tokenize answers and an echoed text prompt scores."""
    commands = _commands(tokenizer)
    pattern = "(" + "|".join(re.escape(c) for c in commands) + ")"
    ids: list[int] = []
    for k, piece in enumerate(re.split(pattern, text)):
        if k % 2:
            ids.append(commands[piece])
        elif piece:
            ids += tokenizer.tokenize_with_masks(piece)
    return ids


def decode(tokenizer: GLMTokenizer, ids: Sequence[int]) -> str:
    """The text of `ids` that `encode` reads back as them: the tokenizer's, with each mask token written as
    in a query (detokenize decodes the text between special tokens on its own, so splitting there first
    changes nothing else)."""
    masks = {i: name for name, i in tokenizer.mask_ids.items()}
    parts, run = [], []
    for token in ids:
        if token in masks:
            parts += [tokenizer.detokenize(run), masks[token]]
            run = []
        else:
            run.append(token)
    parts.append(tokenizer.detokenize(run))
    return "".join(parts)


def tokenizer_info(tokenizer: GLMTokenizer, max_model_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "GLMTokenizer",
        "bos_token": tokenizer.detokenize([tokenizer.sop_id]),  # a GLM block starts with sop
        "eos_token": tokenizer.detokenize([tokenizer.eos_id]),
        "pad_token": tokenizer.detokenize([tokenizer.eos_id]),
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }


def add_tokenizer_routes(
    app: FastAPI, tokenizer: GLMTokenizer, max_model_len: int, read_body: ReadBody
) -> None:
    """Add the three routes to `app` (`read_body`: the app's authenticated JSON body reader)."""

    @app.get("/tokenizer_info")
    async def info() -> dict:
        return tokenizer_info(tokenizer, max_model_len)

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest) -> dict:
        body = await read_body(http)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        if not isinstance(body.get("add_special_tokens", False), bool):
            raise BadRequest("'add_special_tokens' must be true or false", "add_special_tokens")
        ids = encode(tokenizer, prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest) -> dict:
        body = await read_body(http)
        ids = check_token_ids(body.get("tokens"), tokenizer.vocab_size, "tokens", empty=True)
        return {"prompt": decode(tokenizer, ids)}
