"""Prompts given as token ids, and echoed prompts scored (`echo` with `logprobs`): the row that scores each
prompt (glm.scoring's one scorer) and OpenAI's legacy log-probs of its tokens.

How a bidirectional-prefix GLM scores an echoed prompt, as the original's evaluation scores text:

- no `[MASK]`/`[gMASK]` token in the prompt: the prompt is scored causally after `[gMASK]`, the row of an
  `lm` task's first window (`[gMASK]` the whole bidirectional context, then `sop` and the text): the
  server's numbers for a text are the evaluator's;
- the prompt holds one: the tokens up to and including the last one are the bidirectional context and
  those after it the blank's answer, scored causally after `sop`: the original's multiple-choice row (what
  the evaluator and glm/lm_eval_adapter.py score). A task whose context ends in `[gMASK]` is so scored
  over HTTP as in-process.

The block starts with `sop`: a prompt (or answer) that begins with `sop` has it as that `sop` (lm-eval sends
its prefix token first, and /tokenizer_info names `sop` the bos token); otherwise one is put before it.
Unscored (`None`, OpenAI's convention for a token nothing before it predicts): the prompt's first token,
the bidirectional context and the block's `sop`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from glm.decoding.infill import Query
from glm.scoring import PackedRow, TargetScore, choice_row
from glm.serve.protocol import BadRequest
from glm.serve.tokenize import decode, encode
from glm.tokenizer import GLMTokenizer

Prompt = str | list[int]  # a completion request's prompt: text, or token ids


def prompt_ids(tokenizer: GLMTokenizer, prompt: Prompt) -> list[int]:
    """The ids an echoed prompt is scored as: its own, or its text's as /tokenize encodes it."""
    return encode(tokenizer, prompt) if isinstance(prompt, str) else prompt


def prompt_text(tokenizer: GLMTokenizer, prompt: Prompt) -> str:
    """The text a prompt echoes as: itself, or its ids decoded as /detokenize does."""
    return prompt if isinstance(prompt, str) else decode(tokenizer, prompt)


def ids_query(ids: list[int], tokenizer: GLMTokenizer) -> Query:
    """Token ids as a query, as glm.decoding.infill.prepare_query makes one of text: `[gMASK]` appended
    when they hold no mask token, `eos` when they hold one but do not end in one; the first `[MASK]`, else
    `[sMASK]`, else `[gMASK]` is the blank filled."""
    kinds = [tokenizer.get_command(m) for m in ("[MASK]", "[sMASK]", "[gMASK]")]
    gmask = kinds[-1]
    mask = next((m for m in kinds if m in ids), gmask)
    if not any(m in ids for m in kinds):
        ids = [*ids, gmask]
    elif ids[-1] not in kinds:
        ids = [*ids, tokenizer.eos_id]
    return Query(list(ids), mask, mask == gmask, (), tokenizer.detokenize(ids))


def echo_row(ids: Sequence[int], tokenizer: GLMTokenizer) -> tuple[PackedRow | None, list[int]]:
    """The row that scores a prompt's ids, and the index in `ids` of each of its targets, in order (None
    and [] when nothing is scored: a prompt that ends at its last mask or is only `sop`)."""
    mask, gmask = tokenizer.get_command("[MASK]"), tokenizer.get_command("[gMASK]")
    cut = max((i for i, t in enumerate(ids) if t in (mask, gmask)), default=-1)
    context = list(ids[: cut + 1]) if cut >= 0 else [gmask]
    position = cut if cut >= 0 and ids[cut] == mask else None  # [MASK]: the block takes its position
    start = cut + 1
    if start < len(ids) and ids[start] == tokenizer.sop_id:
        start += 1  # the block's own sop
    answer = list(ids[start:])
    if not answer:
        return None, []
    return choice_row(context, [answer], position, sop_id=tokenizer.sop_id), list(range(start, len(ids)))


def token_texts(tokenizer: GLMTokenizer, ids: Sequence[int]) -> list[str]:
    """What each token adds to the decoded text before it (so the texts add up to the ids decoded as
    /detokenize does)."""
    texts, decoded = [], ""
    for k in range(len(ids)):
        text = decode(tokenizer, ids[: k + 1])
        texts.append(text[len(decoded) :] if text.startswith(decoded) else decode(tokenizer, [ids[k]]))
        decoded = text
    return texts


def prompt_logprobs(
    tokenizer: GLMTokenizer, ids: Sequence[int], targets: list[int], score: TargetScore | None, top: int
) -> dict[str, list]:
    """OpenAI's legacy log-probs of a prompt's tokens: `score` (of `targets`, indices in `ids`) with the
    `top` most likely alternatives of each; None where a token is not scored (see the module's doc)."""
    tokens = token_texts(tokenizer, ids)
    values: list[float | None] = [None] * len(ids)
    tops: list[dict[str, float] | None] = [None] * len(ids)
    if score is not None:
        for j, index in enumerate(targets):
            if index == 0:
                continue  # the prompt's first token: nothing before it in the prompt predicts it
            values[index] = float(score.logprobs[j])
            if score.top is not None:
                top_ids, top_values = score.top[0][j, :top].tolist(), score.top[1][j, :top].tolist()
                tops[index] = {decode(tokenizer, [t]): v for t, v in zip(top_ids, top_values, strict=True)}
            else:
                tops[index] = {}
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def echo_logprobs(
    tokenizer: GLMTokenizer,
    score: Callable[[list[PackedRow], int], Awaitable[list[TargetScore]]],
    max_length: int,
    prompts: list[Prompt],
    params: dict[str, Any],
) -> list[dict[str, list] | None]:
    """Each prompt's log-probs when echoed with `logprobs`, else None; `score`: the service's, on the
    engine thread (BadRequest naming `prompt` if a row would exceed the server's `max_length`)."""
    if not params["echo"] or params["logprobs"] is None:
        return [None] * len(prompts)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    rows = [echo_row(i, tokenizer) for i in ids]
    for row, _ in rows:
        if row is not None and len(row.tokens) > max_length:
            raise BadRequest(
                f"the echoed prompt is scored in a row of {len(row.tokens)} tokens, beyond this server's "
                f"{max_length} positions: shorten the prompt",
                "prompt",
            )
    scores = iter(await score([row for row, _ in rows if row is not None], params["logprobs"]))
    return [
        prompt_logprobs(tokenizer, i, targets, next(scores) if row else None, params["logprobs"])
        for i, (row, targets) in zip(ids, rows, strict=True)
    ]


def echo_body(
    tokenizer: GLMTokenizer,
    model_name: str,
    prompts: list[Prompt],
    texts: list[str],
    logprobs: list[dict[str, list] | None],
    n: int,
) -> dict[str, Any]:
    """The response to a `max_tokens: 0` request: each prompt echoed (n times), nothing generated."""
    choices = [
        {"text": text, "index": i * n + j, "logprobs": lp, "finish_reason": "length"}
        for i, (text, lp) in enumerate(zip(texts, logprobs, strict=True))
        for j in range(n)
    ]
    count = sum(len(prompt_ids(tokenizer, p)) for p in prompts)
    usage = {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time())}
    return {**head, "model": model_name, "choices": choices, "usage": usage}
