"""glm.scoring against an independent computation: prefill the context, then decode token by token."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from glm.model import GLM, init_random_weights
from glm.scoring import choice_logprobs, lm_logprobs

MASK, GMASK, SOP = 60, 61, 62


@pytest.fixture(scope="module")
def model() -> GLM:
    torch.manual_seed(0)
    return init_random_weights(GLM(tiny_config()), seed=1, std=0.2).eval()


@torch.no_grad()
def decode_logprobs(
    model: GLM, context: list[int], target: list[int], mask_position: int | None
) -> list[float]:
    """log p(target[j] | ...) by a KV-cache loop: one bidirectional prefill, then sop and the target."""
    n = len(context)
    cache = model.new_cache(1, n + len(target))
    visible = torch.zeros(1, 1, n, n, dtype=torch.bool)  # nothing masked: the context is bidirectional
    model(torch.tensor([context]), torch.arange(n)[None], visible, cache)
    logprobs, previous = [], SOP
    for j, token in enumerate(target):
        position = n + j if mask_position is None else mask_position  # sop is at n (gMASK) or the mask
        step_mask = torch.zeros(1, 1, 1, n + j + 1, dtype=torch.bool)  # sees context and block so far
        logits = model(torch.tensor([[previous]]), torch.tensor([[position]]), step_mask, cache)
        logprobs.append(logits[0, -1].float().log_softmax(-1)[token].item())
        previous = token
    return logprobs


@pytest.mark.parametrize("mask_position", [3, None])
def test_choice_logprobs_match_step_by_step_decoding(model: GLM, mask_position: int | None) -> None:
    context = [5, 9, 14, 2, 33, 7, GMASK] if mask_position is None else [5, 9, 14, MASK, 33, 7, 2]
    choices = [[11], [12, 40, 3], [8, 8], [50, 1, 2, 3, 4]]  # different lengths: padded rows
    scores = choice_logprobs(model, context, choices, mask_position, sop_id=SOP)
    for choice, score in zip(choices, scores, strict=True):
        expected = sum(decode_logprobs(model, context, choice, mask_position))
        assert score == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 4) for s in scores}) == len(scores)  # the choices really differ


def test_choice_scores_do_not_depend_on_other_choices(model: GLM) -> None:
    context = [4, MASK, 21, 30]
    alone = choice_logprobs(model, context, [[7, 9]], 1, sop_id=SOP)
    together = choice_logprobs(model, context, [[1, 2, 3, 4, 5, 6], [7, 9], [3]], 1, sop_id=SOP)
    assert together[1] == pytest.approx(alone[0], abs=1e-6)


def test_lm_logprobs_match_decoding(model: GLM) -> None:
    ids = [3, 17, 25, 9, 9, 41, 5, 12, 30, 2]
    for prefix in (0, 4):
        got = lm_logprobs(model, ids, prefix, gmask_id=GMASK, sop_id=SOP)
        expected = decode_logprobs(model, [*ids[:prefix], GMASK], ids[prefix:], None)
        assert got.shape == (len(ids) - prefix,)
        assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_invalid_arguments(model: GLM) -> None:
    with pytest.raises(ValueError):
        choice_logprobs(model, [1, GMASK], [[]], None, sop_id=SOP)
    with pytest.raises(ValueError):
        choice_logprobs(model, [1, MASK], [[3]], 5, sop_id=SOP)
    with pytest.raises(ValueError):
        lm_logprobs(model, [1, 2], 2, gmask_id=GMASK, sop_id=SOP)
    with pytest.raises(ValueError):  # longer than max_sequence_length (64)
        choice_logprobs(model, [1] * 60 + [GMASK], [[2] * 10], None, sop_id=SOP)
