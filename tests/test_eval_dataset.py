"""Evaluation samples (glm.evaluation.dataset) against hand-built expectations; data checks."""

from __future__ import annotations

import math
import re

import pytest
import torch

from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.evaluation.dataset import (
    LanguageModelWindow,
    build_generation_sample,
    build_multiple_choice_sample,
    check_generation_items,
    check_multiple_choice_items,
    generate_samples,
    generation_samples,
    language_model_document,
    language_model_windows,
    multiple_choice_samples,
    num_windows,
    read_jsonl,
    tokenized_input,
    truncate_choice_context,
)

MASK, GMASK, SOP = 60, 61, 62


def visible(rows: list[str]) -> torch.Tensor:
    """A bool mask from rows of '1' (visible) and '.' (blocked)."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_multiple_choice_sample_with_mask_in_the_text() -> None:
    sample = build_multiple_choice_sample([5, MASK, 7], [[1, 2], [3]], 0, False, MASK, SOP, False)
    row = sample.row
    assert row.tokens == [5, MASK, 7, SOP, 1, SOP]
    assert row.position_ids == [0, 1, 2, 1, 1, 1]  # every block takes the mask's position
    assert [t.positions for t in row.targets] == [[3, 4], [5]] and [t.ids for t in row.targets] == [
        [1, 2],
        [3],
    ]
    assert (row.division, sample.mask_position, sample.is_single_token) == (3, 1, False)
    expected = ["111...", "111...", "111...", "1111..", "11111.", "111..1"]  # choices don't see each other
    assert torch.equal(row.visible(), visible(expected))


def test_multiple_choice_sample_with_appended_gmask() -> None:
    sample = build_multiple_choice_sample([5, 6], [[1, 2], [3, 4]], 1, False, GMASK, SOP, True)
    row = sample.row
    assert row.tokens == [5, 6, GMASK, SOP, 1, SOP, 3]
    assert row.position_ids == [0, 1, 2, 3, 4, 3, 4]  # positions restart after the context per choice
    assert [t.positions for t in row.targets] == [[3, 4], [5, 6]]
    assert (row.division, sample.mask_position) == (3, None)
    expected = ["111....", "111....", "111....", "1111...", "11111..", "111..1.", "111..11"]
    assert torch.equal(row.visible(), visible(expected))


def test_multiple_choice_single_token_mode_appends_the_mask_and_one_sop() -> None:
    sample = build_multiple_choice_sample([5, 6], [[1], [2], [3]], 2, True, MASK, SOP, False)
    row = sample.row
    assert row.tokens == [5, 6, MASK, SOP]
    assert row.position_ids == [0, 1, 2, 2]
    assert [(t.positions, t.ids) for t in row.targets] == [([3], [1]), ([3], [2]), ([3], [3])]
    assert torch.equal(row.visible(), visible(["111.", "111.", "111.", "1111"]))


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
    assert mul[0].context == [17, 18, 19, 20, tokenizer.get_command("[gMASK]")]


def test_pretokenized_text_is_plain_text(tiny_model) -> None:
    """As the original's `tokenizer.tokenize`: a "[MASK]" written in the data is text, not the mask id."""
    _, tokenizer = tiny_model
    mask = tokenizer.get_command("[MASK]")
    assert tokenized_input({"inputs": [1, 2], "inputs_pretokenized": "x"}, "inputs", tokenizer) == [1, 2]
    text = "北京是[MASK]的首都"
    ids = tokenized_input({"inputs_pretokenized": text}, "inputs", tokenizer)
    assert ids == tokenizer.tokenize(text) and mask not in ids
    assert tokenizer.detokenize(ids) == text  # the brackets and the word are in the text
    (sample,) = multiple_choice_samples(
        [{"inputs_pretokenized": text, "choices_pretokenized": ["中国", "日本"], "label": 0}],
        tokenizer,
        64,
        False,
    )
    assert sample.context == [*tokenizer.tokenize(text), mask]  # the task's mask is appended after it
    (generation,) = generation_samples([{"inputs_pretokenized": text}], tokenizer, 64, 4, False, False)
    assert generation.tokens == [*tokenizer.tokenize(text), mask, tokenizer.sop_id]
    choices = tokenized_input({"choices_pretokenized": ["中国", "日本"]}, "choices", tokenizer)
    assert len(choices) == 2 and all(choices)
    with pytest.raises(ValueError, match="neither 'targets'"):
        tokenized_input({}, "targets", tokenizer)


GOOD = {"inputs_pretokenized": "a", "choices_pretokenized": ["b", "c"], "label": 1}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (GOOD | {"choices_pretokenized": []}, "item 2: no choices"),
        (GOOD | {"label": 2}, "item 2: label 2 is out of range for 2 choices"),
        (GOOD | {"label": -1}, "label -1 is out of range"),
        (GOOD | {"label": True}, "'label' must be the index"),
        ({"inputs_pretokenized": "a", "choices_pretokenized": ["b"]}, "'label' must be the index"),
        (GOOD | {"choices_pretokenized": ["b", ""]}, "choice 1 is empty"),
        (GOOD | {"choices_pretokenized": "b"}, "'choices_pretokenized' must be a list"),
        ({"choices_pretokenized": ["b"], "label": 0}, "needs 'inputs' (token ids) or 'inputs_pretokenized'"),
        (GOOD | {"inputs": "a"}, "'inputs' must be a list of token ids"),
    ],
)
def test_multiple_choice_items_are_checked(item, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_multiple_choice_items([GOOD, item], "f.jsonl")


def test_ids_outside_the_vocabulary(tiny_model) -> None:
    _, tokenizer = tiny_model
    item = {"inputs": [1, tokenizer.vocab_size], "choices": [[2]], "label": 0}
    with pytest.raises(
        ValueError, match=f"item 1: inputs holds ids outside the model's vocabulary of {tokenizer.vocab_size}"
    ):
        multiple_choice_samples([item], tokenizer, 64, False)


def test_generation_items_are_checked() -> None:
    check_generation_items([{"inputs_pretokenized": "a", "targets_pretokenized": "b"}, {"inputs": [1]}], "g")
    with pytest.raises(ValueError, match="g: item 1: every entry of 'targets_pretokenized' must be a string"):
        check_generation_items([{"inputs_pretokenized": "a", "targets_pretokenized": [1]}], "g")
    with pytest.raises(ValueError, match="g: no items"):
        check_generation_items([], "g")


def test_read_jsonl_names_the_bad_line(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:9: malformed JSON line")):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(
        ValueError, match=re.escape(f"{path}:2: not UTF-8 text (byte 0xff); save the file as UTF-8")
    ):
        read_jsonl(path)


def test_language_model_document_counts(tiny_model, tmp_path) -> None:
    _, tokenizer = tiny_model
    text = "Two  words\n和中文。\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids, item = language_model_document(tmp_path / "t.txt", tokenizer)
    # words: the stripped text split on single spaces ("Two", "", "words\n和中文。"); bytes: 11 + 4 × 3 + 1
    assert ids == tokenizer.tokenize(text)
    assert item == {"num_original_tokens": 3, "num_tokens": len(ids), "utf8_length": 11 + 12 + 1}
    (tmp_path / "e.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text to score"):
        language_model_document(tmp_path / "e.txt", tokenizer)


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
