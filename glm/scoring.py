"""Log-probabilities of given continuations in the original evaluator's packed layout (the one scorer).

A packed row (`evaluation/dataset.py` of GLM-130B) is a bidirectional context `tokens[:division]` followed
by causal blocks, each seeing the whole context and itself but no other block. A multiple-choice sample is
one row (the context once, then `sop + choice[:-1]` per choice); a language-model window is a row with one
block (`prompt + [mask]`, then `sop + text[:-1]`). Several rows go through one forward pass, right-padded.
Teacher forcing: the distribution at a block position scores the token after it; sums are not
length-normalised (the original's `cond_log_prob` and `calculate_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from glm import query
from glm.model import GLM
from glm.query import PAD_TOKEN


@dataclass(frozen=True)
class Target:
    """Scores `ids[j]` with the next-token distribution at row index `positions[j]`."""

    positions: list[int]
    ids: list[int]


@dataclass(frozen=True)
class TargetScore:
    logprobs: Tensor  # [len(ids)] fp32, on the CPU
    greedy: bool  # every id is the argmax of its distribution (lm-eval's `is_greedy`)
    top: tuple[Tensor, Tensor] | None = None  # (ids, log-probs), [len(ids), k] each: score_rows' top_k

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


@dataclass
class PackedRow:
    """One row: `tokens[:division]` bidirectional; each `blocks` range [start, end) causal after it."""

    tokens: list[int]
    position_ids: list[int]
    division: int
    blocks: list[tuple[int, int]]
    targets: list[Target] = field(default_factory=list)

    def visible(self) -> Tensor:
        """[L, L] bool, True = may attend (the original's 1): everything sees the context, a block row
        sees its own block causally."""
        return query.visible(len(self.tokens), self.division, self.blocks)


def check_row(row: PackedRow, max_length: int) -> None:
    n = len(row.tokens)
    if n > max_length:
        raise ValueError(f"a row of {n} tokens exceeds the model's maximum sequence length {max_length}")
    if len(row.position_ids) != n or not 0 < row.division <= n:
        raise ValueError("a row needs one position per token and a context of at least one token")
    edges = [row.division]
    for start, end in row.blocks:
        if start != edges[-1] or end <= start:
            raise ValueError("blocks must follow the context back to back and be non-empty")
        edges.append(end)
    if edges[-1] != n:
        raise ValueError("every token after the context belongs to a block")
    for target in row.targets:
        if len(target.positions) != len(target.ids) or not target.ids:
            raise ValueError("a target needs one position per id and at least one id")
        if any(not 0 <= p < n for p in target.positions):
            raise ValueError("a target position is outside the row")


@torch.no_grad()
def score_rows(model: GLM, rows: Sequence[PackedRow], top_k: int = 0) -> list[list[TargetScore]]:
    """Every target of every row, all rows in one forward pass; with `top_k`, each distribution's `top_k`
    most likely ids too."""
    if not rows:
        return []
    for row in rows:
        check_row(row, model.config.max_sequence_length)
    batch, longest = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.full((batch, longest), PAD_TOKEN, dtype=torch.long)
    positions = torch.zeros(batch, longest, dtype=torch.long)
    visible = torch.eye(longest, dtype=torch.bool).repeat(batch, 1, 1)  # padding sees itself: no empty row
    wanted = [sorted({p for t in r.targets for p in t.positions}) for r in rows]
    logits_at = torch.zeros(batch, max(1, max(map(len, wanted))), dtype=torch.long)
    for i, (row, at) in enumerate(zip(rows, wanted, strict=True)):
        n = len(row.tokens)
        tokens[i, :n] = torch.tensor(row.tokens)
        positions[i, :n] = torch.tensor(row.position_ids)
        visible[i, :n, :n] = row.visible()
        logits_at[i, : len(at)] = torch.tensor(at, dtype=torch.long)
    device = model.device
    logits = model(
        tokens.to(device),
        positions.to(device),
        (~visible)[:, None].to(device),
        logits_at=logits_at.to(device),
    )  # [batch, k, vocab]
    results = []
    for i, (row, at) in enumerate(zip(rows, wanted, strict=True)):
        row_logits = logits[i, : len(at)].float()  # one row at a time: fp32 logits are [k, vocab]
        logprobs = (row_logits - row_logits.logsumexp(-1, keepdim=True)).cpu()
        best = row_logits.argmax(-1).cpu()
        column = {p: j for j, p in enumerate(at)}
        scores = []
        for target in row.targets:
            index = torch.tensor([column[p] for p in target.positions])
            ids = torch.tensor(target.ids)
            top = None
            if top_k:
                values, top_ids = logprobs[index].topk(min(top_k, logprobs.shape[-1]), dim=-1)
                top = (top_ids, values)
            scores.append(TargetScore(logprobs[index, ids], bool((best[index] == ids).all()), top))
        results.append(scores)
    return results


def choice_scores(model: GLM, rows: Sequence[PackedRow]) -> list[list[float]]:
    """The summed log-prob of every target (a choice) of every row: the original's `cond_log_prob`."""
    return [[s.total for s in scores] for scores in score_rows(model, rows)]


# ---------------------------------------------------------------------------------------------- rows


def choice_row(
    context: Sequence[int],
    choices: Sequence[Sequence[int]],
    mask_position: int | None,
    *,
    sop_id: int,
    single_token: bool = False,
    multitask_encoding: bool = False,
) -> PackedRow:
    """The original's multiple-choice row (`build_multiple_choice_sample`) for a context holding the mask.

    `mask_position` is the index of `[MASK]` in `context`, or None for `[gMASK]` (then each block's
    positions restart after the context). With `[MASK]`, every block takes the mask's position, or, with
    `multitask_encoding` when the mask was appended after the text (`mask_position == len(context) - 1`,
    the caller's promise), positions counting up from it. `single_token`: one `sop` block whose one
    distribution scores every (one-token) choice.
    """
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("need at least one choice, and no choice may be empty")
    if single_token and any(len(c) != 1 for c in choices):
        raise ValueError("single-token mode needs one-token choices")
    division = len(context)
    if mask_position is not None and not 0 <= mask_position < division:
        raise ValueError(f"mask position {mask_position} is outside the context of {division}")
    tokens, positions = list(context), list(range(division))
    blocks, targets = [], []
    for choice in choices[:1] if single_token else choices:
        start, length = len(tokens), len(choice)
        if mask_position is None:
            positions += range(division, division + length)
        elif multitask_encoding:
            positions += range(mask_position, mask_position + length)
        else:
            positions += [mask_position] * length
        tokens += [sop_id, *choice[:-1]]
        blocks.append((start, start + length))
        targets.append(Target(list(range(start, start + length)), list(choice)))
    if single_token:
        targets = [Target([division], list(c)) for c in choices]
    return PackedRow(tokens, positions, division, blocks, targets)


def window_row(prompt: Sequence[int], text: Sequence[int], *, mask_id: int, sop_id: int) -> PackedRow:
    """The original's language-model window: `prompt + [mask]` bidirectional (context only), then
    `sop + text[:-1]` causal scoring `text`; positions are linear."""
    if not text:
        raise ValueError("a window needs text to score")
    division = len(prompt) + 1
    tokens = [*prompt, mask_id, sop_id, *text[:-1]]
    end = len(tokens)
    return PackedRow(
        tokens,
        list(range(end)),
        division,
        [(division, end)],
        [Target(list(range(division, end)), list(text))],
    )


def window_losses(model: GLM, rows: Sequence[PackedRow]) -> list[float]:
    """The summed NLL (nats) of each window row's text (the original's `calculate_loss`)."""
    return [-score.total for (score,) in score_rows(model, rows)]
