"""Evaluation samples as the original GLM-130B evaluator builds them (`evaluation/dataset.py`, §4.4-4.5).

* Data: jsonl items whose `inputs`/`choices`/`targets` are token ids, or `*_pretokenized` text tokenized
  here as plain text (a `[MASK]` written in the text is text, as the original's `tokenizer.tokenize`); an
  `lm` file is raw text, one document. `check_*_items` validate the items before any model is loaded.
* Samples: always left truncation. Multiple choice: the original's packed row (`glm.scoring.choice_row`).
  Generation: `text + [mask, sop]`, or `[mask, sop] + text` when unidirectional. Language modelling:
  sliding windows advancing by `generation_length`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from glm.decoding.batch import generate
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.evaluation.metrics import count_original_tokens
from glm.model import GLM
from glm.query import context_inputs, generated_position
from glm.scoring import PackedRow, choice_row
from glm.tokenizer import GLMTokenizer

Encode = Callable[[str], list[int]]

# ------------------------------------------------------------------------------------------ reading data


def read_utf8(path: Path | str) -> str:
    """A data file's text; a byte that is not UTF-8 is an error naming the file and its line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """One JSON object per non-empty line (the original also read `*.json` files line by line)."""
    items = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}:{error.pos + 1}: malformed JSON line ({error.msg}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(item).__name__}")
        items.append(item)
    return items


def read_text(path: Path | str) -> str:
    """A language-model file: UTF-8 text with something to score."""
    raw = read_utf8(path)
    if not raw.strip():
        raise ValueError(f"{path}: no text to score; a language-model file holds the raw text")
    return raw


def encode_choice(tokenizer: GLMTokenizer, text: str) -> list[int]:
    """Ids of a choice or target span: text filling a blank, so encoded as a segment after a mask
    (plain `tokenize` for icetk, as the original; no sentencepiece word-start dummy otherwise)."""
    return tokenizer.tokenize_segment(text, after_mask=True, before_mask=False)


def tokenized_input(
    item: dict[str, Any], key: str, tokenizer: GLMTokenizer, encode: Encode | None = None
) -> Any:
    """`item[key]` as ids if present, else `item[key + "_pretokenized"]` tokenized: a string with `encode`
    (default: plain `tokenizer.tokenize`), a list element-wise as choices (`encode_choice`)."""
    if key in item:
        return item[key]
    raw = item.get(key + "_pretokenized")
    if raw is None:
        raise ValueError(f"item has neither '{key}' nor '{key}_pretokenized'")
    if isinstance(raw, str):
        return (encode or tokenizer.tokenize)(raw)
    return [encode_choice(tokenizer, text) for text in raw]


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_ids(value: Any, what: str, vocab_size: int) -> None:
    if not _is_ids(value):
        raise ValueError(f"{what} must be a list of token ids")
    if any(not 0 <= t < vocab_size for t in value):
        raise ValueError(f"{what} holds ids outside the model's vocabulary of {vocab_size}")


def _check_text_or_ids(item: dict[str, Any], key: str, where: str) -> None:
    if key in item:
        if not _is_ids(item[key]):
            raise ValueError(f"{where}: '{key}' must be a list of token ids")
    elif not isinstance(item.get(f"{key}_pretokenized"), str):
        raise ValueError(f"{where}: needs '{key}' (token ids) or '{key}_pretokenized' (a string)")


def _spans(item: dict[str, Any], key: str, where: str) -> list[Any]:
    """The item's choices or targets: ids lists under `key`, or strings under `key_pretokenized`."""
    if key in item:
        spans, ok = item[key], _is_ids
    else:
        spans, ok = item.get(f"{key}_pretokenized"), lambda s: isinstance(s, str)
        key = f"{key}_pretokenized"
    if not isinstance(spans, list):
        raise ValueError(f"{where}: '{key}' must be a list")
    if not all(ok(s) for s in spans):
        raise ValueError(
            f"{where}: every entry of '{key}' must be {'a string' if 'pre' in key else 'token ids'}"
        )
    return spans


def check_multiple_choice_items(items: list[dict[str, Any]], path: Path | str) -> None:
    """Inputs, at least one non-empty choice and a label that indexes a choice, for every item."""
    if not items:
        raise ValueError(f"{path}: no items; the file needs one JSON object per line")
    for number, item in enumerate(items, start=1):
        where = f"{path}: item {number}"
        _check_text_or_ids(item, "inputs", where)
        choices = _spans(item, "choices", where)
        if not choices:
            raise ValueError(f"{where}: no choices; a multiple-choice item needs at least one")
        if any(len(c) == 0 for c in choices):
            raise ValueError(
                f"{where}: choice {[len(c) for c in choices].index(0)} is empty; every choice needs text"
            )
        label = item.get("label")
        if not isinstance(label, int) or isinstance(label, bool):
            raise ValueError(f"{where}: 'label' must be the index of the right choice, got {label!r}")
        if not 0 <= label < len(choices):
            raise ValueError(f"{where}: label {label} is out of range for {len(choices)} choices (0-based)")


def check_generation_items(items: list[dict[str, Any]], path: Path | str) -> None:
    """Inputs for every item; targets, where given, a string or a list of strings (or of ids lists)."""
    if not items:
        raise ValueError(f"{path}: no items; the file needs one JSON object per line")
    for number, item in enumerate(items, start=1):
        where = f"{path}: item {number}"
        _check_text_or_ids(item, "inputs", where)
        if isinstance(item.get("targets_pretokenized"), str) and "targets" not in item:
            continue
        if "targets" in item or "targets_pretokenized" in item:
            _spans(item, "targets", where)


# ------------------------------------------------------------------------------------- multiple choice


@dataclass
class MultiChoiceSample:
    """The original's multiple-choice sample: one packed row (context once, then a block per choice)."""

    row: PackedRow
    choices: list[list[int]]
    label: int
    mask_position: int | None  # index of [MASK]; None in [gMASK] mode (positions continue after context)
    is_single_token: bool  # one shared `sop` block scored against every (one-token) choice
    scores: list[float] | None = None  # every choice's summed log-prob, once scored

    @property
    def context(self) -> list[int]:
        return self.row.tokens[: self.row.division]


def truncate_choice_context(text: list[int], choices: list[list[int]], max_seq_length: int) -> list[int]:
    """Left truncation of a multiple-choice context: room for the choices (1 if all single-token) + 2."""
    target = sum(map(len, choices))
    if target == len(choices):
        target = 1
    if target >= max_seq_length:
        raise ValueError(f"choices of {target} tokens do not fit max_seq_length {max_seq_length}")
    if len(text) + target + 2 > max_seq_length:
        text = text[len(text) - (max_seq_length - target - 2) :]
    return text


def build_multiple_choice_sample(
    text: list[int],
    choices: list[list[int]],
    label: int,
    is_single_token: bool,
    mask_id: int,
    sop_id: int,
    use_task_mask: bool,
    multitask_encoding: bool = False,
) -> MultiChoiceSample:
    """The original's `build_multiple_choice_sample`.

    `mask_id` is [gMASK] when `use_task_mask`, else [MASK]; it is appended unless `text` holds it (blank
    filling). `multitask_encoding` (the config's `use_multitask_encoding`) gives [MASK] blocks positions
    counting up from the mask instead of all the mask's, except when blank filling, as the original.
    """
    context = list(text)
    blank_filling = mask_id in context
    if not blank_filling:
        context.append(mask_id)
    mask_position = context.index(mask_id)
    row = choice_row(
        context,
        choices,
        None if use_task_mask else mask_position,
        sop_id=sop_id,
        single_token=is_single_token,
        multitask_encoding=multitask_encoding and not blank_filling,
    )
    return MultiChoiceSample(
        row, [list(c) for c in choices], label, None if use_task_mask else mask_position, is_single_token
    )


def multiple_choice_samples(
    items: list[dict[str, Any]],
    tokenizer: GLMTokenizer,
    max_seq_length: int,
    use_task_mask: bool,
    multitask_encoding: bool = False,
    encode: Encode | None = None,
    vocab_size: int | None = None,
) -> list[MultiChoiceSample]:
    """Samples of one file (items checked by `check_multiple_choice_items`); single-token mode when every
    choice of every item is one token, as the original."""
    mask_id = tokenizer.get_command("[gMASK]" if use_task_mask else "[MASK]")
    vocab = vocab_size or tokenizer.vocab_size
    parsed = []
    for number, item in enumerate(items, start=1):
        text = tokenized_input(item, "inputs", tokenizer, encode)
        choices = tokenized_input(item, "choices", tokenizer)
        _check_ids(text, f"item {number}: inputs", vocab)
        for choice in choices:
            _check_ids(choice, f"item {number}: a choice", vocab)
            if not choice:
                raise ValueError(f"item {number}: a choice has no tokens")
        if not choices:
            raise ValueError(f"item {number}: no choices")
        parsed.append((truncate_choice_context(text, choices, max_seq_length), choices, item["label"]))
    single = all(len(c) == 1 for _, choices, _ in parsed for c in choices)
    return [
        build_multiple_choice_sample(
            text, choices, label, single, mask_id, tokenizer.sop_id, use_task_mask, multitask_encoding
        )
        for text, choices, label in parsed
    ]


# ------------------------------------------------------------------------------------------ generation


@dataclass
class GenerationSample:
    """The original's generation sample: a context whose generated tokens follow at `target_position_ids`."""

    tokens: list[int]
    position_ids: list[int]
    target_position_ids: list[int]
    mask_position: int | None  # the [MASK] filled; None in [gMASK] mode (positions continue)
    unidirectional: bool
    targets: list[list[int]]

    def attention_mask(self) -> Tensor:
        """[ctx, ctx] bool, True = visible: causal, with the context before `sop` bidirectional unless
        unidirectional. Built on demand."""
        return ~context_inputs(len(self.tokens), self.mask_position, self.unidirectional)[1]


def build_generation_sample(
    text: list[int],
    max_gen_length: int,
    mask_id: int,
    sop_id: int,
    use_task_mask: bool,
    unidirectional: bool,
    targets: list[list[int]] | None = None,
) -> GenerationSample:
    """The original's `build_generation_sample`; `mask_id` is [gMASK] when `use_task_mask`, else [MASK]."""
    if mask_id in text:  # blank filling
        if unidirectional or use_task_mask:
            raise ValueError("blank filling (a mask in the input) needs [MASK] and bidirectional attention")
        tokens, mask_position = [*text, sop_id], text.index(mask_id)
    else:
        mask_position = len(text)
        tokens = [mask_id, sop_id, *text] if unidirectional else [*text, mask_id, sop_id]
    n, filled = len(tokens), None if use_task_mask else mask_position
    return GenerationSample(
        tokens,
        context_inputs(n, filled)[0].tolist(),
        [generated_position(n, filled, j) for j in range(max_gen_length)],
        filled,
        unidirectional,
        targets or [],
    )


def generation_targets(item: dict[str, Any], tokenizer: GLMTokenizer) -> list[list[int]]:
    """The item's targets as ids lists (a single string target counts as one)."""
    if "targets" not in item and isinstance(item.get("targets_pretokenized"), str):
        return [encode_choice(tokenizer, item["targets_pretokenized"])]
    if "targets" in item or "targets_pretokenized" in item:
        return tokenized_input(item, "targets", tokenizer)
    return []


def generation_samples(
    items: list[dict[str, Any]],
    tokenizer: GLMTokenizer,
    max_seq_length: int,
    max_gen_length: int,
    use_task_mask: bool,
    unidirectional: bool,
    vocab_size: int | None = None,
) -> list[GenerationSample]:
    """Samples of one file, each context left-truncated to `max_seq_length - max_gen_length - 2`."""
    mask_id = tokenizer.get_command("[gMASK]" if use_task_mask else "[MASK]")
    budget = max_seq_length - max_gen_length - 2
    if budget < 1:
        raise ValueError(f"max_gen_length {max_gen_length} leaves no context under max_seq_length")
    samples = []
    for number, item in enumerate(items, start=1):
        text = tokenized_input(item, "inputs", tokenizer)
        _check_ids(text, f"item {number}: inputs", vocab_size or tokenizer.vocab_size)
        text = text[len(text) - budget :] if len(text) > budget else text
        samples.append(
            build_generation_sample(
                text,
                max_gen_length,
                mask_id,
                tokenizer.sop_id,
                use_task_mask,
                unidirectional,
                generation_targets(item, tokenizer),
            )
        )
    return samples


def generate_samples(
    model: GLM,
    samples: Sequence[GenerationSample],
    strategy: BaseStrategy | BeamSearchStrategy,
    max_gen_length: int,
    end_ids: Sequence[int],
) -> list[list[list[int]]]:
    """Generated ids per sample, all beams best first, without the context and a trailing end token
    (the original's `generate_text`); the samples are decoded as one batch."""
    contexts = [s.tokens for s in samples]
    unidirectional = any(s.unidirectional for s in samples)  # one setting per task
    mask_positions = [None if unidirectional else s.mask_position for s in samples]
    outputs = generate(
        model, contexts, strategy, max_gen_length, mask_positions, unidirectional=unidirectional
    )
    results = []
    for context, beams in zip(contexts, outputs, strict=True):
        cut = [beam[len(context) :] for beam in beams]
        results.append([b[:-1] if b and b[-1] in end_ids else b for b in cut])
    return results


# ---------------------------------------------------------------------------------- language modelling


@dataclass
class LanguageModelWindow:
    """One sliding window: `prompt` is context only, `text` is scored (after `[mask, sop]`)."""

    prompt: list[int]
    text: list[int]


def num_windows(num_tokens: int, max_seq_length: int, generation_length: int) -> int:
    """The original's `num_sequences`."""
    return max(math.ceil(max(num_tokens - (max_seq_length - 1), 0) / generation_length) + 1, 1)


def language_model_windows(
    tokens: list[int], max_seq_length: int, generation_length: int, unidirectional: bool
) -> list[LanguageModelWindow]:
    """Windows of `max_seq_length - 1` tokens advancing by `generation_length`; after the first, the first
    `max_seq_length - 1 - generation_length` tokens are a prompt, so each token is scored once (every
    window is scored whole when unidirectional, as the original)."""
    if not unidirectional and max_seq_length - 1 - generation_length < 0:
        raise ValueError(
            f"generation_length {generation_length} exceeds max_seq_length - 1 = {max_seq_length - 1}: "
            "tokens between windows would never be scored"
        )
    windows = []
    for i in range(num_windows(len(tokens), max_seq_length, generation_length)):
        chunk = tokens[i * generation_length : i * generation_length + max_seq_length - 1]
        if i == 0 or unidirectional:
            windows.append(LanguageModelWindow([], chunk))
        else:
            cut = max_seq_length - 1 - generation_length
            windows.append(LanguageModelWindow(chunk[:cut], chunk[cut:]))
    return [w for w in windows if w.text]


def language_model_document(path: Path | str, tokenizer: GLMTokenizer) -> tuple[list[int], dict[str, Any]]:
    """The file's ids and its one data item: the counts the LM metrics divide by (words as the
    original counts them, tokens, UTF-8 bytes)."""
    raw = read_text(path)
    ids = tokenizer.tokenize(raw)
    item = {
        "num_original_tokens": count_original_tokens(raw),
        "num_tokens": len(ids),
        "utf8_length": len(raw.encode()),
    }
    return ids, item
