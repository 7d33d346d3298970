"""GLM-130B's pre-training objective: blank infilling with `[MASK]` short spans and `[gMASK]` suffixes.

A sample is a context part A (the text with its blanks replaced by mask tokens, bidirectional) followed by
one block per blank, `sop` + the blank's tokens, predicting the blank and then `eop`. Each block sees all of
A and itself causally (the mask of glm/query.py), and takes the positions generation gives it: its
mask's position for `[MASK]`, positions continuing after A for `[gMASK]`. So the first blank of every sample
is laid out exactly as generation lays it out, and the model learns what inference asks of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glm import query

IGNORE = -100  # label of positions without a loss


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    gmask: int
    sop: int
    eop: int
    eos: int
    pad: int


@dataclass
class Sample:
    tokens: list[int]
    positions: list[int]
    labels: list[int]
    context_length: int  # length of part A
    blocks: list[tuple[int, int]]  # [start, end) of each blank's block


def poisson_spans(length: int, ratio: float, lam: float, generator: torch.Generator) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) spans with Poisson(lam) lengths (at least 1) covering ~ratio of length."""
    budget = max(1, round(length * ratio))
    lengths = []
    while sum(lengths) < budget:
        n = int(torch.poisson(torch.tensor([lam]), generator=generator).item())
        lengths.append(max(1, min(n, budget - sum(lengths))))
    # Place the spans in order with random gaps of at least one token between them.
    free = length - sum(lengths) - (len(lengths) - 1)
    if free < 0:
        raise ValueError(f"cannot place {len(lengths)} spans covering {ratio:.0%} of {length} tokens")
    cuts = sorted(torch.randint(0, free + 1, (len(lengths),), generator=generator).tolist())
    spans, offset = [], 0
    for cut, n in zip(cuts, lengths, strict=True):
        start = cut + offset
        spans.append((start, start + n))
        offset += n + 1
    return spans


def mask_sample(text: Sequence[int], spans: list[tuple[int, int]], ids: SpecialIds) -> Sample:
    """`[MASK]` blanks: part A is the text with each span replaced by `[MASK]`, plus `eos` unless it ends in
    a mask (as the prompt of generate.py); each block ends with `eop`."""
    context: list[int] = []
    mask_positions = []
    last = 0
    for start, end in spans:
        context += text[last:start]
        mask_positions.append(len(context))
        context.append(ids.mask)
        last = end
    context += text[last:]
    if context[-1] != ids.mask:
        context.append(ids.eos)
    tokens, positions, labels = list(context), list(range(len(context))), [IGNORE] * len(context)
    blocks = []
    for (start, end), position in zip(spans, mask_positions, strict=True):
        span = list(text[start:end])
        blocks.append((len(tokens), len(tokens) + len(span) + 1))
        tokens += [ids.sop, *span]
        positions += [position] * (len(span) + 1)
        labels += [*span, ids.eop]
    return Sample(tokens, positions, labels, len(context), blocks)


def gmask_sample(text: Sequence[int], split: int, ids: SpecialIds, complete: bool) -> Sample:
    """`[gMASK]` blank: part A is text[:split] + `[gMASK]`; the block continues with text[split:] and ends
    with `eop` only if the text is a whole document (`complete`)."""
    context = [*text[:split], ids.gmask]
    suffix = list(text[split:])
    tokens = [*context, ids.sop, *suffix]
    labels = [IGNORE] * len(context) + suffix + ([ids.eop] if complete else [IGNORE])
    return Sample(tokens, list(range(len(tokens))), labels, len(context), [(len(context), len(tokens))])


def attention_mask(sample: Sample, length: int) -> Tensor:
    """[length, length] bool, True = masked: A bidirectional, each block sees A and itself causally; rows
    and columns past the sample are masked."""
    n = len(sample.tokens)
    mask = torch.ones(length, length, dtype=torch.bool)
    mask[:n, :n] = ~query.visible(n, sample.context_length, sample.blocks)
    return mask


def collate(rows: list[list[Sample]], pad: int, length: int | None = None) -> dict[str, Tensor]:
    """Pack samples into rows (each row a list of samples, each sample seeing only itself) and right-pad:
    tokens, position_ids, labels [b, s] and attention_mask [b, 1, s, s]."""
    length = length or max(sum(len(s.tokens) for s in row) for row in rows)
    tokens = torch.full((len(rows), length), pad, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    masks = torch.ones(len(rows), 1, length, length, dtype=torch.bool)
    for i, row in enumerate(rows):
        offset = 0
        for s in row:
            span = slice(offset, offset + len(s.tokens))
            tokens[i, span], positions[i, span], labels[i, span] = (
                torch.tensor(x) for x in (s.tokens, s.positions, s.labels)
            )
            masks[i, 0, span, span] = attention_mask(s, len(s.tokens))
            offset += len(s.tokens)
    return {"tokens": tokens, "position_ids": positions, "labels": labels, "attention_mask": masks}


def make_sample(
    text: Sequence[int],
    complete: bool,
    ids: SpecialIds,
    generator: torch.Generator,
    gmask_ratio: float = 0.7,
    mask_ratio: float = 0.15,
    lam: float = 3.0,
) -> Sample:
    """One training sample from a window of text: `[gMASK]` with probability gmask_ratio, else `[MASK]` spans.

    GLM-130B used [gMASK] for 70 % of its blank-infilling samples and [MASK] spans (Poisson lambda 3, 15 %
    of tokens) for the rest.
    """
    if len(text) < 4 or torch.rand(1, generator=generator).item() < gmask_ratio:
        low = max(1, len(text) // 5)
        split = int(torch.randint(low, max(low + 1, len(text) * 4 // 5), (1,), generator=generator))
        return gmask_sample(text, min(split, len(text) - 1), ids, complete)
    return mask_sample(text, poisson_spans(len(text), mask_ratio, lam, generator), ids)
