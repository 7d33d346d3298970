"""OpenAI's chat completions over a base model: the messages turned into one prompt by a fixed template that
ends in `[gMASK]`, generated as a completion, and answered in the chat schema (whole or streamed deltas).

The model is a base (pre-trained, not instruction-tuned) model: it continues the transcript, it was never
taught to follow it. The template (CHAT_TEMPLATE in the README):

    {system messages, one per paragraph}\n\n        (when there are any)
    User: {user message}\n
    Assistant: {assistant message}\n
    ...
    User: {last message}\n
    Assistant: [gMASK]

The answer stops where the model starts the next user turn (TURN, a stop string added to the request's own).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from glm.serve.protocol import MAX_LOGPROBS, BadRequest, Completion, parse_params
from glm.tokenizer import MASK_PATTERN

if TYPE_CHECKING:
    from glm.serve.service import Service

TURN = "\nUser:"  # where the model begins to write the next user message: the answer ends there
ROLES = {"system": "", "developer": "", "user": "User: ", "assistant": "Assistant: "}


def message_text(message: Any, index: int) -> tuple[str, str]:
    """The role and text of one message (content: a string or a list of text parts)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(f"'{where}' must be an object with 'role' and 'content'", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise BadRequest(
            f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)}", "messages"
        )
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"'{where}.content' must be a string or a list of text parts", "messages")
    if MASK_PATTERN.search(content):
        raise BadRequest(
            f"'{where}.content' contains a mask token ([MASK], [sMASK] or [gMASK]): blank filling is "
            "for /v1/completions",
            "messages",
        )
    return role, content


def chat_prompt(messages: Any) -> str:
    """The one prompt of a conversation (the template above), ending in `[gMASK]`."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    if not any(role == "user" for role, _ in turns):
        raise BadRequest("'messages' needs at least one message with role 'user'", "messages")
    system = "\n\n".join(text.strip() for role, text in turns if not ROLES[role])
    dialogue = "".join(f"{ROLES[role]}{text.strip()}\n" for role, text in turns if ROLES[role])
    return (f"{system}\n\n" if system else "") + dialogue + "Assistant: [gMASK]"


def parse_chat(body: dict, width: int, max_length: int) -> tuple[str, dict[str, Any]]:
    """The prompt and the completion fields of a chat request (OpenAI's names mapped onto the completion's:
    max_completion_tokens, logprobs true + top_logprobs)."""
    fields = {k: v for k, v in body.items() if k not in ("messages", "logprobs", "top_logprobs", "echo")}
    if body.get("max_completion_tokens") is not None:
        fields["max_tokens"] = body["max_completion_tokens"]
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest(f"'logprobs' must be true or false, got {json.dumps(logprobs)}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise BadRequest(
                f"'top_logprobs' must be an integer between 0 and {MAX_LOGPROBS}, got {json.dumps(top)}",
                "top_logprobs",
            )
    if logprobs:
        fields["logprobs"] = top or 0
    prompt = chat_prompt(body.get("messages"))
    params = parse_params(fields, width, max_length)
    if TURN not in params["stop"]:
        params["stop"] = (*params["stop"], TURN)
    return prompt, params


def chat_logprobs(legacy: dict[str, list] | None) -> dict[str, list] | None:
    """OpenAI's chat log-probs ({"content": [token, logprob, bytes, top_logprobs]}) of the legacy ones."""
    if legacy is None:
        return None
    content = []
    for token, value, top in zip(
        legacy["tokens"], legacy["token_logprobs"], legacy["top_logprobs"], strict=True
    ):
        alternatives = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()]
        content.append(
            {"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": alternatives}
        )
    return {"content": content}


class ChatCompletion(Completion):
    """A completion answered as OpenAI's chat.completion object, or its chat.completion.chunk events (the
    first chunk of each choice carries the role)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.head = {**self.head, "id": "chat" + self.head["id"], "object": "chat.completion"}
        self.started: set[int] = set()

    def body(self) -> dict[str, Any]:
        whole = super().body()
        whole["choices"] = [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": chat_logprobs(c["logprobs"]),
                "finish_reason": c["finish_reason"],
            }
            for c in whole["choices"]
        ]
        return whole

    def _chunk(self, index: int, text: str, finish_reason: str | None = None, logprobs: Any = None) -> str:
        delta: dict[str, str] = {"content": text}
        if index not in self.started:
            self.started.add(index)
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs)}
        choice["finish_reason"] = finish_reason
        chunk = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n"


async def chat_completions(service: Service, http: HTTPRequest, body: dict) -> Any:
    """POST /v1/chat/completions: the conversation's prompt generated as one completion."""
    engine = service.engine
    prompt, params = parse_chat(body, engine.rows.width, engine.rows.max_length)
    watch, requests = service.submit_completions([prompt], params)
    completion = ChatCompletion(service.tokenizer, service.model_name, [prompt], params, requests)
    updates = service.wait(http.is_disconnected, watch, requests)
    if not params["stream"]:
        async for _ in updates:
            pass
        return completion.body()
    return StreamingResponse(completion.stream(updates), media_type="text/event-stream")
