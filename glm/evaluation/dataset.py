"""Evaluation samples as the original GLM-130B evaluator builds them (`evaluation/dataset.py`, §4.4-4.5).

* Data: jsonl items whose `inputs`/`choices`/`targets`/`text` are token ids, or `*_pretokenized` text
  tokenized here (a `[MASK]`-style token written in the text becomes its special id); an `lm` file is raw
  text, one document.
* Samples: always left truncation. Multiple choice: a bidirectional context holding `[MASK]`, or the task
  mask appended; each choice a causal block after `sop` that sees the context and itself (one shared block
  when every choice is one token). Generation: `text + [mask, sop]`, or `[mask, sop] + text` when
  unidirectional. Language modelling: sliding windows advancing by `generation_length`.
* Scoring: several samples' blocks go through one forward pass (`score_blocks`); the numbers are those of
  `glm.scoring.block_logprobs` for each block alone, i.e. those of the original's block-diagonal packing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glm.decoding import PAD_TOKEN, build_inputs, generate
from glm.evaluation.metrics import count_original_tokens
from glm.model import GLM
from glm.strategies import BaseStrategy, BeamSearchStrategy
from glm.tokenizer import GLMTokenizer

# ------------------------------------------------------------------------------------------ reading data


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """One JSON object per non-empty line (the original also read `*.json` files line by line)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object: {error.msg}") from None
    return items


def encode_text(tokenizer: GLMTokenizer, text: str) -> list[int]:
    """Ids of `text`; `[MASK]`, `[sMASK]` and `[gMASK]` written in it become their special ids."""
    return tokenizer.tokenize_with_masks(text)


def encode_choice(tokenizer: GLMTokenizer, text: str) -> list[int]:
    """Ids of a choice or target span: text filling a blank, so encoded as a segment after a mask
    (plain `tokenize` for icetk, as the original; no sentencepiece word-start dummy otherwise)."""
    return tokenizer.tokenize_segment(text, after_mask=True, before_mask=False)


def tokenized_input(item: dict[str, Any], key: str, tokenizer: GLMTokenizer) -> Any:
    """`item[key]` as ids if present, else `item[key + "_pretokenized"]` tokenized (a list element-wise)."""
    if key in item:
        return item[key]
    raw = item.get(key + "_pretokenized")
    if raw is None:
        raise ValueError(f"item has neither '{key}' nor '{key}_pretokenized'")
    if isinstance(raw, str):
        return encode_text(tokenizer, raw)
    return [encode_choice(tokenizer, text) for text in raw]


def _check_ids(value: Any, what: str) -> None:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{what} must be a list of token ids")


# ------------------------------------------------------------------------------------- multiple choice


@dataclass
class MultiChoiceSample:
    """The original's multiple-choice sample: the context (`tokens[:division]`) and choice blocks."""

    tokens: list[int]
    position_ids: list[int]
    choices: list[list[int]]
    choice_target_ids: list[list[int]]  # positions in `tokens` whose next-token logits score each choice
    division: int  # context length, the mask included
    mask_position: int | None  # index of [MASK]; None in [gMASK] mode (positions continue after context)
    label: int
    is_single_token: bool  # one shared `sop` row scored against every (one-token) choice

    def attention_mask(self) -> Tensor:
        """[L, L] bool, True = visible (the original's 1): the context is seen by all, each choice block
        is causal and sees no other block. Built on demand (the scorer never needs it)."""
        blocks = [torch.ones(len(t), len(t), dtype=torch.bool).tril() for t in self.choice_target_ids]
        mask = torch.block_diag(torch.ones(self.division, self.division, dtype=torch.bool), *blocks)
        mask[:, : self.division] = True
        return mask


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
) -> MultiChoiceSample:
    """The original's `build_multiple_choice_sample` (without `use_multitask_encoding`).

    `mask_id` is [gMASK] when `use_task_mask`, else [MASK]; it is appended unless `text` holds it. Each
    choice adds `sop + choice[:-1]` (positions: the mask's, or continuing after the context for [gMASK]);
    single-token mode adds one `sop` scored against every choice.
    """
    tokens, positions = list(text), list(range(len(text)))
    if mask_id in text:
        mask_position = text.index(mask_id)
    else:
        mask_position = len(tokens)
        tokens.append(mask_id)
        positions.append(mask_position)
    division = len(tokens)
    target_ids = []
    for choice in choices:
        length = 1 if is_single_token else len(choice)
        positions += list(range(division, division + length)) if use_task_mask else [mask_position] * length
        target_ids.append(list(range(len(tokens), len(tokens) + length)))
        tokens += [sop_id, *choice[: length - 1]]
        if is_single_token:
            break
    return MultiChoiceSample(
        tokens,
        positions,
        [list(c) for c in choices],
        target_ids,
        division,
        None if use_task_mask else mask_position,
        label,
        is_single_token,
    )


def multiple_choice_samples(
    items: list[dict[str, Any]],
    tokenizer: GLMTokenizer,
    max_seq_length: int,
    use_task_mask: bool,
) -> list[MultiChoiceSample]:
    """Samples of one file; single-token mode when every choice of every item is one token."""
    mask_id = tokenizer.get_command("[gMASK]" if use_task_mask else "[MASK]")
    parsed = []
    for number, item in enumerate(items, start=1):
        text, choices = (
            tokenized_input(item, "inputs", tokenizer),
            tokenized_input(item, "choices", tokenizer),
        )
        _check_ids(text, f"item {number}: inputs")
        for choice in choices:
            _check_ids(choice, f"item {number}: a choice")
            if not choice:
                raise ValueError(f"item {number}: a choice has no tokens")
        if not isinstance(item.get("label"), int):
            raise ValueError(f"item {number}: 'label' must be a choice index")
        parsed.append((truncate_choice_context(text, choices, max_seq_length), choices, item["label"]))
    single = all(len(c) == 1 for _, choices, _ in parsed for c in choices)
    return [
        build_multiple_choice_sample(text, choices, label, single, mask_id, tokenizer.sop_id, use_task_mask)
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
        n = len(self.tokens)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if not self.unidirectional:
            mask[: n - 1, : n - 1] = True
        return mask


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
    n = len(tokens)
    positions = list(range(n))
    target_positions = list(range(n, n + max_gen_length))
    if not use_task_mask:
        positions[n - 1 :] = [mask_position]
        target_positions = [mask_position] * max_gen_length
    return GenerationSample(
        tokens,
        positions,
        target_positions,
        None if use_task_mask else mask_position,
        unidirectional,
        targets or [],
    )


def generation_samples(
    items: list[dict[str, Any]],
    tokenizer: GLMTokenizer,
    max_seq_length: int,
    max_gen_length: int,
    use_task_mask: bool,
    unidirectional: bool,
) -> list[GenerationSample]:
    """Samples of one file, each context left-truncated to `max_seq_length - max_gen_length - 2`."""
    mask_id = tokenizer.get_command("[gMASK]" if use_task_mask else "[MASK]")
    budget = max_seq_length - max_gen_length - 2
    if budget < 1:
        raise ValueError(f"max_gen_length {max_gen_length} leaves no context under max_seq_length")
    samples = []
    for number, item in enumerate(items, start=1):
        text = tokenized_input(item, "inputs", tokenizer)
        _check_ids(text, f"item {number}: inputs")
        has_targets = "targets" in item or "targets_pretokenized" in item
        targets = tokenized_input(item, "targets", tokenizer) if has_targets else []
        text = text[len(text) - budget :] if len(text) > budget else text
        samples.append(
            build_generation_sample(
                text, max_gen_length, mask_id, tokenizer.sop_id, use_task_mask, unidirectional, targets
            )
        )
    return samples


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
        raise ValueError(f"generation_length {generation_length} exceeds max_seq_length - 1")
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
    """The file's ids and its one data item (with the word count PPL divides by)."""
    raw = Path(path).read_text(encoding="utf-8")
    if not raw.strip():
        raise ValueError(f"{path}: no text to score")
    return tokenizer.tokenize(raw), {"num_original_tokens": count_original_tokens(raw)}


# ---------------------------------------------------------------------------------------------- scoring


def _block_logits(
    model: GLM,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    mask_positions: Sequence[int | None],
    sop_id: int,
) -> Tensor:
    """Logits [rows, longest, V] predicting each continuation token (row i: context i + sop + block i).

    Contexts may differ in length: they are right-padded as in `glm.decoding.build_inputs`, so every row
    gets the logits it would get alone.
    """
    contexts = [[*c, sop_id] for c in contexts]
    longest = max(len(c) for c in continuations)
    limit = model.config.max_sequence_length
    if any(len(c) + len(t) - 1 > limit for c, t in zip(contexts, continuations, strict=True)):
        raise ValueError(f"a sample exceeds the model's maximum sequence length {limit}")
    device = model.device
    inputs = build_inputs(contexts, longest - 1, mask_positions, device)
    padded = inputs.tokens.shape[1]
    block = torch.full((len(contexts), longest), PAD_TOKEN, dtype=torch.long)
    for i, continuation in enumerate(continuations):
        block[i, : len(continuation)] = torch.tensor(continuation)
    tokens = torch.cat([inputs.tokens, block[:, :-1].to(device)], dim=1)
    logits_at = torch.empty(len(contexts), longest, dtype=torch.long)
    logits_at[:, 0] = inputs.context_lengths.cpu() - 1  # each row's sop
    logits_at[:, 1:] = torch.arange(padded, padded + longest - 1)
    return model(tokens, inputs.position_ids, inputs.attention_mask, logits_at=logits_at.to(device))


@torch.no_grad()
def score_blocks(
    model: GLM,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    mask_positions: Sequence[int | None],
    sop_id: int,
) -> list[Tensor]:
    """Per-token log-probs (fp32) of each continuation after its own context, in one forward pass.

    Row i equals `glm.scoring.block_logprobs(model, contexts[i], [continuations[i]], mask_positions[i])`.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("need at least one continuation, and none may be empty")
    logits = _block_logits(model, contexts, continuations, mask_positions, sop_id)
    targets = torch.zeros(logits.shape[:2], dtype=torch.long)
    for i, continuation in enumerate(continuations):
        targets[i, : len(continuation)] = torch.tensor(continuation)
    logprobs = logits.float().log_softmax(-1).gather(-1, targets.to(logits.device)[..., None]).squeeze(-1)
    return [logprobs[i, : len(c)].cpu() for i, c in enumerate(continuations)]


@torch.no_grad()
def multiple_choice_logprobs(
    model: GLM, samples: Sequence[MultiChoiceSample], sop_id: int
) -> list[list[float]]:
    """The summed log-prob of every choice of every sample (the original's `cond_log_prob`), one forward.

    A single-token sample has one row, whose first distribution scores all its choices.
    """
    contexts, blocks, positions, owners = [], [], [], []
    for index, sample in enumerate(samples):
        for choice in sample.choices[:1] if sample.is_single_token else sample.choices:
            contexts.append(sample.tokens[: sample.division])
            blocks.append(choice)
            positions.append(sample.mask_position)
            owners.append(index)
    logprobs = _block_logits(model, contexts, blocks, positions, sop_id).float().log_softmax(-1)
    scores: list[list[float]] = [[] for _ in samples]
    for row, (owner, block) in enumerate(zip(owners, blocks, strict=True)):
        sample = samples[owner]
        if sample.is_single_token:
            scores[owner] = [float(logprobs[row, 0, c[0]]) for c in sample.choices]
        else:
            scores[owner].append(float(logprobs[row, torch.arange(len(block)), torch.tensor(block)].sum()))
    return scores


@torch.no_grad()
def window_losses(
    model: GLM, windows: Sequence[LanguageModelWindow], mask_id: int, sop_id: int
) -> list[float]:
    """The summed NLL (nats) of each window's `text` (the original's `calculate_loss`), one forward.

    Linear positions, a bidirectional `prompt + [mask]`, then `sop + text[:-1]` causal, as the original.
    """
    contexts = [[*w.prompt, mask_id] for w in windows]
    texts = [w.text for w in windows]
    logprobs = score_blocks(model, contexts, texts, [None] * len(windows), sop_id)
    return [-float(t.sum()) for t in logprobs]


# ------------------------------------------------------------------------------------------- decoding


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
