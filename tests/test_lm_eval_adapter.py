"""glm.lm_eval_adapter's request logic against independent computations (lm_eval itself is not needed):
each continuation alone in its own row, and the original's literal LM windows (tests/scoring_oracle.py)."""

from __future__ import annotations

import pytest
from scoring_oracle import block_distributions, choice_positions, per_choice_scores, window_nll_by_hand

import glm.lm_eval_adapter as adapter_module
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.evaluation.dataset import encode_choice, language_model_windows
from glm.lm_eval_adapter import GLMAdapter

MASKED = "这固然得费一番[MASK]的工夫。"
PLAIN = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def adapter(tiny_model) -> GLMAdapter:
    model, tokenizer = tiny_model
    return GLMAdapter(model, tokenizer, rolling_stride=100, max_gen_toks=8)


def test_loglikelihood_fills_the_mask(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    choices = ["爬罗剔抉", "立足之地", " the lazy dog"]
    results = adapter.loglikelihood([(MASKED, c) for c in choices])
    ids = tokenizer.tokenize_with_masks(MASKED)
    position = ids.index(tokenizer.get_command("[MASK]"))
    blocks = [encode_choice(tokenizer, c) for c in choices]
    want = per_choice_scores(model, ids, blocks, tokenizer.sop_id, choice_positions(len(ids), position))
    assert [score for score, _ in results] == pytest.approx(want, abs=1e-4)


def test_loglikelihood_appends_gmask(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    requests = [(PLAIN, " the lazy dog"), (MASKED, "立足之地"), (PLAIN, " a cat")]
    results = adapter.loglikelihood(requests)
    context = [*tokenizer.tokenize(PLAIN), tokenizer.get_command("[gMASK]")]
    blocks = [encode_choice(tokenizer, requests[i][1]) for i in (0, 2)]
    want = per_choice_scores(model, context, blocks, tokenizer.sop_id, choice_positions(len(context), None))
    assert [results[0][0], results[2][0]] == pytest.approx(want, abs=1e-4)


def test_is_greedy_matches_the_argmax(adapter: GLMAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy exactly when every token is the argmax over the whole vocabulary given the earlier ones.

    The untrained model's argmax is a special token, which no text encodes to: continuations are given
    as ids here ("ids:1,2,3") by replacing the adapter's `encode_choice`.
    """
    model, tokenizer = adapter.model, adapter.tokenizer
    real = encode_choice
    monkeypatch.setattr(
        adapter_module,
        "encode_choice",
        lambda tok, text: (
            [int(t) for t in text[4:].split(",")] if text.startswith("ids:") else real(tok, text)
        ),
    )
    context = [*tokenizer.tokenize(PLAIN), tokenizer.get_command("[gMASK]")]
    positions = choice_positions(len(context), None)
    greedy: list[int] = []
    for _ in range(3):  # the argmax path: the distribution after sop + greedy so far
        distribution = block_distributions(
            model, context, [*greedy, 0], tokenizer.sop_id, positions(len(greedy) + 1)
        )
        greedy.append(int(distribution[-1].argmax()))
    other = next(v for v in range(tokenizer.text_offset, tokenizer.vocab_size) if v not in greedy)
    cases = {tuple(greedy): True, tuple(greedy[:1]): True, (*greedy[:2], other): False, (other,): False}
    results = adapter.loglikelihood([(PLAIN, "ids:" + ",".join(map(str, ids))) for ids in cases])
    want = per_choice_scores(model, context, [list(ids) for ids in cases], tokenizer.sop_id, positions)
    assert [score for score, _ in results] == pytest.approx(want, abs=1e-4)
    assert [is_greedy for _, is_greedy in results] == list(cases.values())


def test_loglikelihood_rolling_equals_the_original_windows(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.sop_id
    short = "A short document. 一段短文。"
    [result] = adapter.loglikelihood_rolling([(short,)])
    assert result == pytest.approx(
        -window_nll_by_hand(model, [], tokenizer.tokenize(short), gmask, sop), abs=1e-3
    )

    long = " ".join(f"Sentence {i} tells of 第{i}个故事." for i in range(120))
    ids = tokenizer.tokenize(long)
    assert len(ids) > 2 * adapter.max_length
    windows = language_model_windows(ids, adapter.max_length, adapter.rolling_stride, unidirectional=False)
    assert [t for w in windows for t in w.text] == ids  # every token scored once
    want = -sum(window_nll_by_hand(model, w.prompt, w.text, gmask, sop) for w in windows)
    [result] = adapter.loglikelihood_rolling([(long,)])
    assert result == pytest.approx(want, rel=1e-4)


def test_generate_until_is_greedy_and_stops(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    context = [*tokenizer.tokenize(PLAIN), tokenizer.get_command("[gMASK]"), tokenizer.sop_id]
    strategy = BaseStrategy(1, temperature=1.0, top_k=1, end_tokens=tokenizer.end_ids)
    output = generate(model, [context], strategy, 8)[0][0][len(context) :]
    output = [t for t in output if t >= 0 and t not in tokenizer.end_ids]
    text = tokenizer.detokenize(output)
    [whole] = adapter.generate_until([(PLAIN, {"until": [], "max_gen_toks": 8})])
    assert whole == text
    if len(text) > 1:
        stop = text[len(text) // 2 :]
        [cut] = adapter.generate_until([(PLAIN, {"until": [stop], "max_gen_toks": 8})])
        assert cut == text[: text.find(stop)]
