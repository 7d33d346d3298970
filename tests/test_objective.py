"""The pre-training objective lays blanks out exactly as generation does."""

from __future__ import annotations

import itertools

import torch
from tolerance import assert_model_close

from glm.objective import (
    IGNORE,
    SpecialIds,
    attention_mask,
    collate,
    gmask_sample,
    make_sample,
    mask_sample,
    poisson_spans,
)
from glm.query import build_inputs

IDS = SpecialIds(mask=90, gmask=91, sop=94, eop=95, eos=2, pad=0)
TEXT = list(range(10, 30))


def generation_layout(context: list[int], generated: int, mask_position: int | None):
    inputs = build_inputs([context], generated, [mask_position])
    return inputs.position_ids[0], inputs.attention_mask[0, 0]


def test_gmask_sample_matches_generation():
    sample = gmask_sample(TEXT, 12, IDS, complete=True)
    context = [*TEXT[:12], IDS.gmask, IDS.sop]
    assert sample.tokens == context + TEXT[12:]
    assert sample.labels == [IGNORE] * 13 + TEXT[12:] + [IDS.eop]
    positions, mask = generation_layout(context, len(TEXT) - 12, None)
    assert sample.positions == positions.tolist()
    assert torch.equal(attention_mask(sample, len(sample.tokens)), mask)


def test_incomplete_gmask_sample_has_no_end_label():
    sample = gmask_sample(TEXT, 5, IDS, complete=False)
    assert sample.labels[-1] == IGNORE and IDS.eop not in sample.labels


def test_single_mask_sample_matches_generation():
    sample = mask_sample(TEXT, [(4, 7)], IDS)
    context = [*TEXT[:4], IDS.mask, *TEXT[7:], IDS.eos]  # eos: the text does not end in a mask
    assert sample.tokens[: len(context)] == context
    assert sample.tokens[len(context) :] == [IDS.sop, *TEXT[4:7]]
    assert sample.labels == [IGNORE] * len(context) + TEXT[4:7] + [IDS.eop]
    positions, mask = generation_layout([*context, IDS.sop], 3, 4)
    assert sample.positions == positions.tolist()
    assert torch.equal(attention_mask(sample, len(sample.tokens)), mask)


def test_several_masks_each_block_sees_the_context_and_itself():
    sample = mask_sample(TEXT, [(2, 4), (10, 11), (17, 20)], IDS)  # ends in a mask: no eos
    n = sample.context_length
    assert sample.tokens[n - 1] == IDS.mask and IDS.eos not in sample.tokens
    assert [sample.positions[s] for s, _ in sample.blocks] == [2, 9, 16]  # each mask's index in part A
    mask = attention_mask(sample, len(sample.tokens) + 2)
    for start, end in sample.blocks:
        for row in range(start, end):
            visible = (~mask[row]).nonzero().flatten().tolist()
            assert visible == list(range(n)) + list(range(start, row + 1))
    assert mask[:n, n:].all() and not mask[:n, :n].any()  # the context never sees the blanks


def test_poisson_spans_cover_about_15_percent_without_overlap():
    generator = torch.Generator().manual_seed(0)
    covered, total = 0, 0
    for _ in range(200):
        spans = poisson_spans(200, 0.15, 3.0, generator)
        assert all(a < b <= c for (a, b), (c, _) in itertools.pairwise(spans))
        covered += sum(b - a for a, b in spans)
        total += 200
    assert abs(covered / total - 0.15) < 0.01


def test_make_sample_is_deterministic_and_collates():
    samples = [make_sample(TEXT, True, IDS, torch.Generator().manual_seed(s)) for s in range(6)]
    again = [make_sample(TEXT, True, IDS, torch.Generator().manual_seed(s)) for s in range(6)]
    assert [s.tokens for s in samples] == [s.tokens for s in again]
    assert {IDS.gmask in s.tokens for s in samples} == {True, False}  # both kinds occur
    batch = collate([[s] for s in samples], IDS.pad)
    length = max(len(s.tokens) for s in samples)
    assert batch["tokens"].shape == (6, length) and batch["attention_mask"].shape == (6, 1, length, length)
    for i, s in enumerate(samples):
        assert batch["labels"][i, len(s.tokens) :].eq(IGNORE).all()
        assert batch["attention_mask"][i, 0, :, len(s.tokens) :].all()  # padding is never seen


def test_packed_samples_do_not_see_each_other():
    from glm.model import GLM, init_random_weights
    from tests.conftest import tiny_config

    model = init_random_weights(GLM(tiny_config(vocab_size=100)), seed=1, std=0.1)
    first = mask_sample(TEXT, [(3, 6), (12, 13)], IDS)
    second = gmask_sample(TEXT[:9], 4, IDS, complete=True)
    packed = collate([[first, second]], IDS.pad, length=len(first.tokens) + len(second.tokens) + 3)
    alone = collate([[second]], IDS.pad)
    with torch.no_grad():
        logits = model(packed["tokens"], packed["position_ids"], packed["attention_mask"])
        expected = model(alone["tokens"], alone["position_ids"], alone["attention_mask"])
    n = len(first.tokens)
    assert_model_close(logits[0, n : n + len(second.tokens)], expected[0], model.config)
    assert packed["labels"][0, n + len(second.tokens) :].eq(IGNORE).all()
