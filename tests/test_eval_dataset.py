"""Evaluation samples (glm.evaluation.dataset) against hand-built expectations and glm.scoring."""

from __future__ import annotations

import math

import pytest
import torch

from glm.decoding import generate
from glm.evaluation.dataset import (
    LanguageModelWindow,
    build_generation_sample,
    build_multiple_choice_sample,
    encode_text,
    generate_samples,
    generation_samples,
    language_model_windows,
    multiple_choice_logprobs,
    multiple_choice_samples,
    num_windows,
    score_blocks,
    tokenized_input,
    truncate_choice_context,
    window_losses,
)
from glm.evaluation.metrics import perplexity
from glm.scoring import block_logprobs, choice_logprobs, lm_logprobs
from glm.strategies import BaseStrategy

MASK, GMASK, SOP = 60, 61, 62


def visible(rows: list[str]) -> torch.Tensor:
    """A bool mask from rows of '1' (visible) and '.' (blocked)."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_multiple_choice_sample_with_mask_in_the_text() -> None:
    sample = build_multiple_choice_sample([5, MASK, 7], [[1, 2], [3]], 0, False, MASK, SOP, False)
    assert sample.tokens == [5, MASK, 7, SOP, 1, SOP]
    assert sample.position_ids == [0, 1, 2, 1, 1, 1]  # every block takes the mask's position
    assert sample.choice_target_ids == [[3, 4], [5]]
    assert (sample.division, sample.mask_position, sample.is_single_token) == (3, 1, False)
    expected = ["111...", "111...", "111...", "1111..", "11111.", "111..1"]  # choices don't see each other
    assert torch.equal(sample.attention_mask(), visible(expected))


def test_multiple_choice_sample_with_appended_gmask() -> None:
    sample = build_multiple_choice_sample([5, 6], [[1, 2], [3, 4]], 1, False, GMASK, SOP, True)
    assert sample.tokens == [5, 6, GMASK, SOP, 1, SOP, 3]
    assert sample.position_ids == [0, 1, 2, 3, 4, 3, 4]  # positions restart after the context per choice
    assert sample.choice_target_ids == [[3, 4], [5, 6]]
    assert (sample.division, sample.mask_position) == (3, None)
    expected = ["111....", "111....", "111....", "1111...", "11111..", "111..1.", "111..11"]
    assert torch.equal(sample.attention_mask(), visible(expected))


def test_multiple_choice_single_token_mode_appends_the_mask_and_one_sop() -> None:
    sample = build_multiple_choice_sample([5, 6], [[1], [2], [3]], 2, True, MASK, SOP, False)
    assert sample.tokens == [5, 6, MASK, SOP]
    assert sample.position_ids == [0, 1, 2, 2]
    assert sample.choice_target_ids == [[3]]
    assert torch.equal(sample.attention_mask(), visible(["111.", "111.", "111.", "1111"]))


def test_generation_samples() -> None:
    blank = build_generation_sample([5, MASK, 7], 3, MASK, SOP, False, False)
    assert blank.tokens == [5, MASK, 7, SOP]
    assert (blank.position_ids, blank.target_position_ids, blank.mask_position) == ([0, 1, 2, 1], [1] * 3, 1)
    assert torch.equal(blank.attention_mask(), visible(["111.", "111.", "111.", "1111"]))

    appended = build_generation_sample([5, 6], 3, MASK, SOP, False, False)
    assert appended.tokens == [5, 6, MASK, SOP]
    assert (appended.position_ids, appended.target_position_ids) == ([0, 1, 2, 2], [2, 2, 2])

    gmask = build_generation_sample([5, 6], 3, GMASK, SOP, True, False)
    assert gmask.tokens == [5, 6, GMASK, SOP]
    assert (gmask.position_ids, gmask.target_position_ids, gmask.mask_position) == (
        [0, 1, 2, 3],
        [4, 5, 6],
        None,
    )

    causal = build_generation_sample([5, 6], 3, GMASK, SOP, True, True)
    assert causal.tokens == [GMASK, SOP, 5, 6]  # the mask and sop go in front
    assert (causal.position_ids, causal.target_position_ids) == ([0, 1, 2, 3], [4, 5, 6])
    assert torch.equal(causal.attention_mask(), visible(["1...", "11..", "111.", "1111"]))

    with pytest.raises(ValueError, match="blank filling"):
        build_generation_sample([5, GMASK], 3, GMASK, SOP, True, True)


def test_left_truncation(tiny_model) -> None:
    _, tokenizer = tiny_model
    assert truncate_choice_context(list(range(10)), [[1, 2], [3]], 8) == [7, 8, 9]  # 8 - 3 - 2 kept
    assert truncate_choice_context(list(range(10)), [[1], [2]], 8) == [
        5,
        6,
        7,
        8,
        9,
    ]  # single token: 8 - 1 - 2
    assert truncate_choice_context([1, 2], [[1, 2], [3]], 8) == [1, 2]
    items = [{"inputs": list(range(1, 21)), "targets": [[4]]}]
    (sample,) = generation_samples(items, tokenizer, 16, 4, True, False)
    assert sample.tokens[:-2] == list(range(11, 21))  # 16 - 4 - 2 = 10 last tokens
    mul = multiple_choice_samples(
        [{"inputs": list(range(1, 21)), "choices": [[7, 8]], "label": 0}], tokenizer, 8, True
    )
    assert mul[0].tokens[: mul[0].division] == [17, 18, 19, 20, tokenizer.get_command("[gMASK]")]


def test_inputs_as_ids_or_text(tiny_model) -> None:
    _, tokenizer = tiny_model
    assert tokenized_input({"inputs": [1, 2], "inputs_pretokenized": "x"}, "inputs", tokenizer) == [1, 2]
    ids = tokenized_input({"inputs_pretokenized": "北京是[MASK]的首都"}, "inputs", tokenizer)
    assert ids.count(tokenizer.get_command("[MASK]")) == 1 and ids == encode_text(
        tokenizer, "北京是[MASK]的首都"
    )
    choices = tokenized_input({"choices_pretokenized": ["中国", "日本"]}, "choices", tokenizer)
    assert len(choices) == 2 and all(choices)
    with pytest.raises(ValueError, match="neither 'targets'"):
        tokenized_input({}, "targets", tokenizer)


def test_language_model_windows_by_hand() -> None:
    tokens = list(range(20))
    # max_seq_length 8, generation_length 3: windows of 7 tokens; after the first, 4 are prompt.
    assert num_windows(20, 8, 3) == math.ceil((20 - 7) / 3) + 1 == 6
    windows = language_model_windows(tokens, 8, 3, unidirectional=False)
    assert windows[0] == LanguageModelWindow([], [0, 1, 2, 3, 4, 5, 6])
    assert windows[1] == LanguageModelWindow([3, 4, 5, 6], [7, 8, 9])
    assert windows[5] == LanguageModelWindow([15, 16, 17, 18], [19])
    assert [t for w in windows for t in w.text] == tokens  # every token scored exactly once
    assert num_windows(5, 8, 3) == 1 and language_model_windows(tokens[:5], 8, 3, False) == [
        LanguageModelWindow([], tokens[:5])
    ]
    unidirectional = language_model_windows(tokens, 8, 3, unidirectional=True)
    assert all(not w.prompt for w in unidirectional) and unidirectional[1].text == [3, 4, 5, 6, 7, 8, 9]


def test_window_losses_and_ppl_match_lm_logprobs(tiny_model) -> None:
    model, tokenizer = tiny_model
    gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.sop_id
    tokens = tokenizer.tokenize("The river runs past the old mill and on into the town by the sea. " * 2)
    windows = language_model_windows(tokens, 12, 4, unidirectional=False)
    losses = window_losses(model, windows, gmask, sop)  # all windows in one forward
    expected = [
        -float(lm_logprobs(model, w.prompt + w.text, len(w.prompt), gmask_id=gmask, sop_id=sop).sum())
        for w in windows
    ]
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-4)
    words = 28
    assert perplexity(losses, [{"num_original_tokens": words}]) == pytest.approx(
        math.exp(min(20, sum(expected) / words)), rel=1e-5
    )


def test_batched_choice_scores_equal_choice_logprobs(tiny_model) -> None:
    model, tokenizer = tiny_model
    items = [
        {
            "inputs_pretokenized": "北京是[MASK]的首都。",
            "choices_pretokenized": ["中国", "日本", "美国"],
            "label": 0,
        },
        {
            "inputs_pretokenized": "The cat sat on the",
            "choices_pretokenized": [" mat", " dog and the"],
            "label": 1,
        },
    ]
    for use_task_mask in (False, True):
        samples = multiple_choice_samples(items, tokenizer, 64, use_task_mask)
        scores = multiple_choice_logprobs(model, samples, tokenizer.sop_id)
        for sample, got in zip(samples, scores, strict=True):
            context = sample.tokens[: sample.division]
            want = choice_logprobs(
                model, context, sample.choices, sample.mask_position, sop_id=tokenizer.sop_id
            )
            assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    single = [
        {"inputs": [30, 31, 32], "choices": [[40], [41], [42]], "label": 0},
        {"inputs": [33], "choices": [[44], [45]], "label": 1},
    ]
    samples = multiple_choice_samples(single, tokenizer, 64, False)
    assert all(s.is_single_token for s in samples)
    for sample, got in zip(samples, multiple_choice_logprobs(model, samples, tokenizer.sop_id), strict=True):
        context = sample.tokens[: sample.division]
        want = choice_logprobs(model, context, sample.choices, sample.mask_position, sop_id=tokenizer.sop_id)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    rows = score_blocks(
        model, [[30, MASK], [30, 31, 32, GMASK]], [[40, 41], [42]], [1, None], tokenizer.sop_id
    )
    assert rows[0] == pytest.approx(
        block_logprobs(model, [30, MASK], [[40, 41]], 1, sop_id=tokenizer.sop_id)[0]
    )


def test_generate_samples_equal_generate(tiny_model) -> None:
    model, tokenizer = tiny_model
    items = [{"inputs_pretokenized": "The river [MASK] the town."}, {"inputs_pretokenized": "Music and"}]
    samples = generation_samples(items, tokenizer, 64, 5, False, False)
    strategy = BaseStrategy(2, top_k=1, end_tokens=tokenizer.end_ids)
    got = generate_samples(model, samples, strategy, 5, tokenizer.end_ids)
    for sample, beams in zip(samples, got, strict=True):
        alone = generate(
            model,
            [sample.tokens],
            BaseStrategy(1, top_k=1, end_tokens=tokenizer.end_ids),
            5,
            [sample.mask_position],
        )
        expected = alone[0][0][len(sample.tokens) :]
        if expected and expected[-1] in tokenizer.end_ids:
            expected = expected[:-1]
        assert beams == [expected]


@torch.no_grad()
def test_unidirectional_generation_equals_a_full_causal_forward(tiny_model) -> None:
    model, tokenizer = tiny_model
    gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.sop_id
    texts = [tokenizer.tokenize("Music and"), tokenizer.tokenize("The old mill by the sea")]
    samples = [build_generation_sample(t, 4, gmask, sop, True, True) for t in texts]
    got = generate_samples(model, samples, BaseStrategy(2, top_k=1, end_tokens=[]), 4, [])
    for sample, beams in zip(samples, got, strict=True):
        tokens = list(sample.tokens)
        for _ in range(4):  # greedy, recomputing the whole causal sequence each step
            n = len(tokens)
            mask = ~torch.ones(n, n, dtype=torch.bool).tril()
            logits = model(torch.tensor([tokens]), torch.arange(n)[None], mask[None, None])
            tokens.append(int(logits[0, -1].argmax()))
        assert beams == [tokens[len(sample.tokens) :]]
