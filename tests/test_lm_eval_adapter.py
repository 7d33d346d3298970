"""glm.lm_eval_adapter's request logic against independent computations (lm_eval itself is not needed)."""

from __future__ import annotations

import pytest

import glm.lm_eval_adapter as adapter_module
from glm.decoding import generate
from glm.evaluation.dataset import encode_choice, encode_text, language_model_windows, window_losses
from glm.lm_eval_adapter import GLMAdapter
from glm.scoring import block_logprobs, lm_logprobs
from glm.strategies import BaseStrategy

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
    ids = encode_text(tokenizer, MASKED)
    position = ids.index(tokenizer.get_command("[MASK]"))
    for choice, (score, _) in zip(choices, results, strict=True):
        expected = block_logprobs(
            model, ids, [encode_choice(tokenizer, choice)], position, sop_id=adapter.tokenizer.sop_id
        )
        assert score == pytest.approx(float(expected[0].sum()), abs=1e-4)


def test_loglikelihood_appends_gmask(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    requests = [(PLAIN, " the lazy dog"), (MASKED, "立足之地"), (PLAIN, " a cat")]
    results = adapter.loglikelihood(requests)
    context = [*encode_text(tokenizer, PLAIN), tokenizer.get_command("[gMASK]")]
    for index in (0, 2):
        block = encode_choice(tokenizer, requests[index][1])
        expected = block_logprobs(model, context, [block], None, sop_id=tokenizer.sop_id)[0]
        assert results[index][0] == pytest.approx(float(expected.sum()), abs=1e-4)


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
    context = [*encode_text(tokenizer, PLAIN), tokenizer.get_command("[gMASK]")]
    greedy: list[int] = []
    for _ in range(3):  # the argmax path, one vocabulary-wide scoring per step
        rows = [[*greedy, v] for v in range(tokenizer.vocab_size)]
        last = [float(t[-1]) for t in block_logprobs(model, context, rows, None, sop_id=tokenizer.sop_id)]
        greedy.append(max(range(len(last)), key=last.__getitem__))
    other = next(v for v in range(tokenizer.text_offset, tokenizer.vocab_size) if v not in greedy)
    cases = {tuple(greedy): True, tuple(greedy[:1]): True, (*greedy[:2], other): False, (other,): False}
    results = adapter.loglikelihood([(PLAIN, "ids:" + ",".join(map(str, ids))) for ids in cases])
    for (ids, expected), (score, is_greedy) in zip(cases.items(), results, strict=True):
        reference = block_logprobs(model, context, [list(ids)], None, sop_id=tokenizer.sop_id)[0]
        assert score == pytest.approx(float(reference.sum()), abs=1e-4)
        assert is_greedy == expected


def test_loglikelihood_rolling_equals_the_evaluators_windows(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    short = "A short document. 一段短文。"
    ids = tokenizer.tokenize(short)
    [result] = adapter.loglikelihood_rolling([(short,)])
    gmask = tokenizer.get_command("[gMASK]")
    expected = lm_logprobs(model, ids, 0, gmask_id=gmask, sop_id=tokenizer.sop_id)
    assert result == pytest.approx(float(expected.sum()), abs=1e-3)

    long = " ".join(f"Sentence {i} tells of 第{i}个故事." for i in range(120))
    ids = tokenizer.tokenize(long)
    assert len(ids) > 2 * adapter.max_length
    windows = language_model_windows(ids, adapter.max_length, adapter.rolling_stride, unidirectional=False)
    assert sum(len(w.text) for w in windows) == len(ids)
    expected_total = -sum(window_losses(model, windows, gmask, tokenizer.sop_id))
    [result] = adapter.loglikelihood_rolling([(long,)])
    assert result == pytest.approx(expected_total, rel=1e-4)


def test_generate_until_is_greedy_and_stops(adapter: GLMAdapter) -> None:
    model, tokenizer = adapter.model, adapter.tokenizer
    context = [*encode_text(tokenizer, PLAIN), tokenizer.get_command("[gMASK]"), tokenizer.sop_id]
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
