"""The HTTP protocol: request bodies parsed and checked (BadRequest names the bad field), error bodies, and
the completion and fill responses, whole or streamed as server-sent events."""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glm.decoding.infill import Answer
    from glm.decoding.requests import Output, Request
    from glm.tokenizer import GLMTokenizer

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


# ----------------------------------------------------------------------------------------------- requests


def parse_body(raw: bytes, authorization: str, api_key: str | None, model_name: str) -> dict:
    """The JSON object of a request, once its key (with an api_key) and its model are checked."""
    if api_key is not None and not secrets.compare_digest(
        authorization.encode(), f"Bearer {api_key}".encode()
    ):
        raise BadRequest("a valid API key is needed: send 'Authorization: Bearer <key>'", None, 401)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"model '{model}' does not exist; this server has '{model_name}'", "model", 404)
    return body


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
        "max_tokens": _number(body, "max_tokens", 16, 0, max_length - 2, integer=True),
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
    if params["max_tokens"] == 0 and (params["stream"] or not params["echo"]):
        raise BadRequest(
            "'max_tokens' 0 (the prompt scored alone) needs 'echo': true and no 'stream'", "max_tokens"
        )
    if params["num_beams"] > 1 and params["n"] > params["num_beams"]:  # beam search: the n best beams
        raise BadRequest("'n' must be at most num_beams with beam search: the n best beams", "n")
    if params["num_beams"] > 1 and params["logprobs"] is not None:
        raise BadRequest("'logprobs' is not available with beam search (num_beams > 1)", "logprobs")
    return params


def parse_prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completion request: a string, a list of token ids (each in 0..vocab_size - 1), or
    a non-empty list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and not isinstance(prompt[0], list | str)
    ):
        prompts = [prompt]  # one text, or one prompt of token ids
    else:
        prompts = prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str | list) for p in prompts):
        raise BadRequest(
            "'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt"
        )
    for p in prompts:
        if isinstance(p, list):
            check_token_ids(p, vocab_size, "prompt")
    return prompts


def check_token_ids(value: Any, vocab_size: int, field: str, empty: bool = False) -> list[int]:
    """`value` as a list of token ids of this vocabulary, non-empty unless `empty` (BadRequest naming
    `field` if not)."""
    if not isinstance(value, list) or not (value or empty):
        raise BadRequest(f"'{field}' must be a non-empty list of token ids", field)
    for k, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise BadRequest(f"'{field}' must hold integer token ids, got {json.dumps(token)} at {k}", field)
        if not 0 <= token < vocab_size:
            raise BadRequest(
                f"'{field}' holds token id {token} at {k}: ids must be in 0..{vocab_size - 1} "
                "(this server's vocabulary)",
                field,
            )
    return value


def parse_fill(body: dict, width: int, max_length: int) -> tuple[str, dict[str, Any]]:
    """The prompt and sampling fields of a fill request (one prompt, one answer, not streamed)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", "prompt")
    params = parse_params(body, width, max_length)
    if params["max_tokens"] < 1:
        raise BadRequest("'max_tokens' must be at least 1 to fill a blank", "max_tokens")
    if params["stream"] or params["n"] > 1:
        raise BadRequest(
            "'stream' and 'n' > 1 are for /v1/completions", "stream" if params["stream"] else "n"
        )
    return prompt, params


def check_length(ids: list[int], params: dict[str, Any], max_length: int) -> None:
    """BadRequest unless a context of `ids`, sop and max_tokens fits in a row of `max_length` positions."""
    total = len(ids) + 1 + params["max_tokens"]
    if total > max_length:
        raise BadRequest(
            f"the prompt ({len(ids) + 1} tokens with sop) + max_tokens {params['max_tokens']} = {total} "
            f"exceeds this server's {max_length} positions: shorten the prompt or lower max_tokens",
            "max_tokens",
        )


def generation_failed(request: Request) -> None:
    """A request the decode step failed answers 500."""
    if request.error is not None:
        raise BadRequest(f"generation failed: {request.error}", None, 500)


# ---------------------------------------------------------------------------------------------- responses


class Completion:
    """The response to a completion request over `requests` (request i's tag is i): OpenAI's legacy
    completion object, or its server-sent events."""

    def __init__(
        self,
        tokenizer: GLMTokenizer,
        model_name: str,
        prompts: Sequence[str],
        params: dict[str, Any],
        requests: list[Request],
        prompt_logprobs: Sequence[dict[str, list] | None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.requests = requests
        self.n = requests[0].width if params["num_beams"] == 1 else params["n"]  # choices per prompt
        rid = f"cmpl-{secrets.token_hex(12)}"
        self.head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        self.echo = [p if params["echo"] else "" for p in prompts]  # the prompts' texts
        self.prompt_logprobs = prompt_logprobs or [None] * len(prompts)  # echoed prompts' (glm.serve.echo)

    def choices(self, request: Request, echoed: bool = True) -> list[dict]:
        """The request's choices; `echoed`: their log-probs begin with the echoed prompt's (False: the
        stream sent those with the echo)."""
        generation_failed(request)
        choices = []
        for j, output in enumerate((request.outputs or [])[: self.n]):
            prefix = self.echo[request.tag]
            logprobs = None
            if self.params["logprobs"] is not None:
                logprobs = token_logprobs(self.tokenizer, output, len(prefix))
                if echoed:
                    logprobs = join_logprobs(self.prompt_logprobs[request.tag], logprobs)
            choices.append(
                {
                    "text": prefix + output_text(self.tokenizer, output),
                    "index": request.tag * self.n + j,
                    "logprobs": logprobs,
                    "finish_reason": output.finish_reason,
                }
            )
        return choices

    def body(self) -> dict[str, Any]:
        """The whole response, once every request is done."""
        choices = sorted((c for r in self.requests for c in self.choices(r)), key=lambda c: c["index"])
        completion = sum(len(o.ids) for r in self.requests for o in (r.outputs or [])[: self.n])
        prompt_tokens = sum(len(r.prompt) for r in self.requests)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        return {**self.head, "choices": choices, "usage": usage}

    def _chunk(self, index: int, text: str, finish_reason: str | None = None, logprobs: Any = None) -> str:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        return f"data: {json.dumps({**self.head, 'choices': [choice]})}\n\n"

    async def stream(self, updates: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[str]:
        """Deltas after every step ("step" updates), held back at incomplete characters and where a stop
        string may be forming; the rest with the finish reason (and log-probs) when a request is done
        ("done")."""
        n, echo = self.n, self.echo
        hold = max((len(s) for s in self.params["stop"]), default=1) - 1
        sent = {(r.tag, j): "" for r in self.requests for j in range(n)}
        if self.params["echo"]:
            for request in self.requests:
                for j in range(n):
                    lp = self.prompt_logprobs[request.tag]
                    yield self._chunk(request.tag * n + j, echo[request.tag], logprobs=lp)
        async for kind, value in updates:
            if kind == "step":
                tag, rows = value
                for j, ids in enumerate(rows[:n]):
                    text = self.tokenizer.detokenize(ids).rstrip("\ufffd")
                    text = text[: max(len(text) - hold, 0)]
                    key = (tag, j)
                    if len(text) > len(sent[key]) and text.startswith(sent[key]):
                        yield self._chunk(tag * n + j, text[len(sent[key]) :])
                        sent[key] = text
                continue
            for j, output in enumerate(self.choices(value, echoed=False)):
                key = (value.tag, j)
                text = output["text"][len(echo[value.tag]) :]
                rest = text[len(sent[key]) :] if text.startswith(sent[key]) else text
                yield self._chunk(output["index"], rest, output["finish_reason"], output["logprobs"])
        yield "data: [DONE]\n\n"


def token_logprobs(tokenizer: GLMTokenizer, output: Output, offset: int) -> dict[str, list]:
    """OpenAI's legacy log-probs; a token's text is what it adds to the decoded text before it (so the
    tokens add up to the completion, spaces included); the alternatives are decoded alone."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    entries: Sequence = output.logprobs or []
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


def join_logprobs(
    prompt: dict[str, list] | None, generated: dict[str, list] | None
) -> dict[str, list] | None:
    """A choice's log-probs: its echoed prompt's, then its generated tokens' (each list in order)."""
    if prompt is None or generated is None:
        return generated if prompt is None else prompt
    return {key: [*prompt[key], *generated[key]] for key in prompt}


def output_text(tokenizer: GLMTokenizer, output: Output) -> str:
    return output.text if output.text is not None else tokenizer.detokenize(output.ids)


def fill_body(tokenizer: GLMTokenizer, model_name: str, answer: Answer) -> dict[str, Any]:
    return {
        "object": "fill",
        "model": model_name,
        "text": answer.text(tokenizer),
        "blanks": answer.blanks(tokenizer),
    }


def models_body(model_name: str) -> dict[str, Any]:
    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "glm130b-py"}
    return {"object": "list", "data": [card]}
