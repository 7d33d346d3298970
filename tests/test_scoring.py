"""glm.scoring's packed rows against independent computations: each choice alone in its own row (the old
per-choice layout, tests/scoring_oracle.py), a KV-cache decoding loop, and the original's packed and LM
layouts written out by hand from the reference description (glm130b-system.md §4.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from scoring_oracle import choice_positions, per_choice_scores, window_nll_by_hand

from glm.api import load
from glm.evaluation.dataset import build_multiple_choice_sample, encode_choice, read_jsonl
from glm.model import GLM, init_random_weights
from glm.scoring import PackedRow, Target, choice_row, choice_scores, score_rows, window_losses, window_row

MASK, GMASK, SOP = 60, 61, 62
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> GLM:
    return init_random_weights(GLM(tiny_config()), seed=1, std=0.2).eval()


def visible(rows: list[str]) -> torch.Tensor:
    """A bool mask from rows of '1' (visible) and '.' (blocked)."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


CASES = {  # context (holding the mask), choices, mask position (None: gMASK), multitask encoding
    "mask in the middle": (
        [5, 9, 14, MASK, 33, 7, 2],
        [[11], [12, 40, 3], [8, 8], [50, 1, 2, 3, 4]],
        3,
        False,
    ),
    "mask appended": ([5, 9, 14, 2, MASK], [[12, 40, 3], [8, 8], [1]], 4, False),
    "mask appended, multitask encoding": ([5, 9, 14, 2, MASK], [[12, 40, 3], [8, 8], [1]], 4, True),
    "gMASK": ([5, 9, 14, 2, 33, 7, GMASK], [[12, 40, 3], [8, 8], [50, 1, 2, 3, 4]], None, False),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_row_equals_each_choice_alone(model: GLM, case: str) -> None:
    context, choices, mask_position, multitask = CASES[case]
    row = choice_row(context, choices, mask_position, sop_id=SOP, multitask_encoding=multitask)
    (got,) = choice_scores(model, [row])
    positions = choice_positions(len(context), mask_position, multitask)
    want = per_choice_scores(model, context, choices, SOP, positions)
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(s, 3) for s in got}) == len(got)  # the choices really differ


def test_single_token_row_scores_every_choice_from_one_sop(model: GLM) -> None:
    context, choices = [5, 9, MASK, 2], [[11], [12], [40], [3]]
    row = choice_row(context, choices, 2, sop_id=SOP, single_token=True)
    assert row.tokens == [*context, SOP]
    want = per_choice_scores(model, context, choices, SOP, choice_positions(4, 2))
    assert choice_scores(model, [row])[0] == pytest.approx(want, abs=1e-4)


def test_a_batch_of_rows_equals_each_row_alone(model: GLM) -> None:
    rows = [choice_row(c, ch, m, sop_id=SOP, multitask_encoding=t) for c, ch, m, t in CASES.values()] + [
        window_row([3, 4, 5, 6], [7, 8, 9], mask_id=GMASK, sop_id=SOP)
    ]
    together = choice_scores(model, rows)  # rows of different lengths: right padding
    for row, scores in zip(rows, together, strict=True):
        assert scores == pytest.approx(choice_scores(model, [row])[0], abs=1e-5)


def test_choices_do_not_see_each_other(model: GLM) -> None:
    context = [4, MASK, 21, 30]
    alone = choice_scores(model, [choice_row(context, [[7, 9]], 1, sop_id=SOP)])[0]
    together = choice_scores(model, [choice_row(context, [[1, 2, 3, 4, 5, 6], [7, 9], [3]], 1, sop_id=SOP)])[
        0
    ]
    assert together[1] == pytest.approx(alone[0], abs=1e-5)


@torch.no_grad()
def test_original_packed_layout_written_by_hand(model: GLM) -> None:
    """`build_multiple_choice_sample` for text [5, 6, 7], choices [11, 12] and [13, 14, 15], [MASK] appended:
    tokens text + [MASK] + [sop, 11] + [sop, 13, 14]; positions all the mask's (3); block-diagonal causal
    blocks after a bidirectional context; choice_target_ids [4, 5] and [6, 7, 8]."""
    tokens = [5, 6, 7, MASK, SOP, 11, SOP, 13, 14]
    positions = [0, 1, 2, 3, 3, 3, 3, 3, 3]
    mask = visible(
        [
            "1111.....",
            "1111.....",
            "1111.....",
            "1111.....",
            "11111....",
            "111111...",
            "1111..1..",
            "1111..11.",
            "1111..111",
        ]
    )
    logits = model(torch.tensor([tokens]), torch.tensor([positions]), ~mask[None, None])[0].float()
    logprobs = logits.log_softmax(-1)
    want = [
        float(logprobs[4, 11] + logprobs[5, 12]),
        float(logprobs[6, 13] + logprobs[7, 14] + logprobs[8, 15]),
    ]
    sample = build_multiple_choice_sample([5, 6, 7], [[11, 12], [13, 14, 15]], 1, False, MASK, SOP, False)
    assert sample.row.tokens == tokens and sample.row.position_ids == positions
    assert torch.equal(sample.row.visible(), mask)
    assert choice_scores(model, [sample.row])[0] == pytest.approx(want, abs=1e-5)

    # use_multitask_encoding: the same tokens, positions counting up from the mask per block
    multitask = build_multiple_choice_sample(
        [5, 6, 7], [[11, 12], [13, 14, 15]], 1, False, MASK, SOP, False, True
    )
    assert multitask.row.tokens == tokens and multitask.row.position_ids == [0, 1, 2, 3, 3, 4, 3, 4, 5]
    # ... but not when the mask is in the text (blank filling), as the original
    blank = build_multiple_choice_sample([5, MASK, 7], [[11, 12]], 0, False, MASK, SOP, False, True)
    assert blank.row.position_ids == [0, 1, 2, 1, 1]
    # [gMASK]: every block restarts at the position after the context
    gmask = build_multiple_choice_sample([5, 6, 7], [[11, 12], [13, 14, 15]], 1, False, GMASK, SOP, True)
    assert gmask.row.position_ids == [0, 1, 2, 3, 4, 5, 4, 5, 6]


def test_original_lm_window_layout_written_by_hand(model: GLM) -> None:
    for prompt, text in (([3, 4, 5], [7, 8, 9, 10]), ([], [7, 8])):
        want = window_nll_by_hand(model, prompt, text, GMASK, SOP)
        row = window_row(prompt, text, mask_id=GMASK, sop_id=SOP)
        assert row.tokens == [*prompt, GMASK, SOP, *text[:-1]] and row.position_ids == list(
            range(len(row.tokens))
        )
        assert window_losses(model, [row]) == pytest.approx([want], abs=1e-5)


@torch.no_grad()
def decode_logprobs(
    model: GLM, context: list[int], target: list[int], mask_position: int | None
) -> list[float]:
    """log p(target[j] | ...) by a KV-cache loop: one bidirectional prefill, then sop and the target."""
    n = len(context)
    cache = model.new_cache(1, n + len(target))
    model(torch.tensor([context]), torch.arange(n)[None], torch.zeros(1, 1, n, n, dtype=torch.bool), cache)
    logprobs, previous = [], SOP
    for j, token in enumerate(target):
        position = n + j if mask_position is None else mask_position
        step_mask = torch.zeros(1, 1, 1, n + j + 1, dtype=torch.bool)  # sees the context and the block so far
        logits = model(torch.tensor([[previous]]), torch.tensor([[position]]), step_mask, cache)
        logprobs.append(logits[0, -1].float().log_softmax(-1)[token].item())
        previous = token
    return logprobs


@pytest.mark.parametrize("mask_position", [3, None])
def test_packed_scores_equal_step_by_step_decoding(model: GLM, mask_position: int | None) -> None:
    context = [5, 9, 14, 2, 33, 7, GMASK] if mask_position is None else [5, 9, 14, MASK, 33, 7, 2]
    choices = [[11], [12, 40, 3], [8, 8], [50, 1, 2, 3, 4]]
    (scores,) = score_rows(model, [choice_row(context, choices, mask_position, sop_id=SOP)])
    for choice, score in zip(choices, scores, strict=True):
        assert score.logprobs.tolist() == pytest.approx(
            decode_logprobs(model, context, choice, mask_position), abs=1e-5
        )


def test_greedy_flag(model: GLM) -> None:
    context = [5, 9, 14, GMASK]
    logits = model(
        torch.tensor([[*context, SOP]]), torch.arange(5)[None], torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    )
    ranked = logits[0, -1].argsort(descending=True).tolist()
    (scores,) = score_rows(model, [choice_row(context, [[ranked[0]], [ranked[1]]], None, sop_id=SOP)])
    assert [s.greedy for s in scores] == [True, False]


def test_sat_tiny_packed_equals_each_choice_alone(sat_tiny: GLM) -> None:
    mask, gmask, sop = 990, 991, 994  # sat_tiny's special ids
    for context, position in (([11, 27, 305, mask, 42, 7], 3), ([11, 27, 305, 42, 7, 613, gmask], None)):
        choices = [[88, 517, 23], [940], [5, 6]]
        (got,) = choice_scores(sat_tiny, [choice_row(context, choices, position, sop_id=sop)])
        want = per_choice_scores(sat_tiny, context, choices, sop, choice_positions(len(context), position))
        assert got == pytest.approx(want, abs=1e-4)


def test_bundled_model_packed_equals_each_choice_alone() -> None:
    model, tokenizer = load()
    mask = tokenizer.get_command("[MASK]")
    for item in read_jsonl(REPO / "tasks/offline/zh_idiom_cloze/test.jsonl")[:2]:
        context = tokenizer.tokenize_with_masks(item["inputs_pretokenized"])
        choices = [encode_choice(tokenizer, c) for c in item["choices_pretokenized"]]
        position = context.index(mask)
        (got,) = choice_scores(model, [choice_row(context, choices, position, sop_id=tokenizer.sop_id)])
        want = per_choice_scores(
            model, context, choices, tokenizer.sop_id, choice_positions(len(context), position)
        )
        assert got == pytest.approx(want, abs=2e-3)  # fp16 weights, fp32 compute: summation order only


def test_invalid_rows(model: GLM) -> None:
    with pytest.raises(ValueError, match="no choice may be empty"):
        choice_row([1, GMASK], [[]], None, sop_id=SOP)
    with pytest.raises(ValueError, match="outside the context"):
        choice_row([1, MASK], [[3]], 5, sop_id=SOP)
    with pytest.raises(ValueError, match="maximum sequence length 64"):
        score_rows(model, [choice_row([1] * 60 + [GMASK], [[2] * 10], None, sop_id=SOP)])
    with pytest.raises(ValueError, match="outside the row"):
        score_rows(model, [PackedRow([1, 2], [0, 1], 1, [(1, 2)], [Target([5], [3])])])
