"""Batched prefill: prompts of different lengths and masks in one padded forward give the logits and cache
contents each gets prefilled alone, padding never lands in the cache, the token budget splits forwards, and
the engine and generate() built on it give every request what it gets alone, a bad one failing alone."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_model_close

from glm.api import load
from glm.decoding import generate
from glm.decoding.engine import Engine
from glm.decoding.requests import Request
from glm.decoding.rows import Prompt, Rows, prefill_batches
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.model import KVCache
from glm.query import context_inputs

END = 601
# (prompt, mask position, unidirectional): different lengths, [gMASK] and [MASK] layouts, causal contexts
PROMPTS = [
    ([20, 30, 40, 50, 600], None, False),
    ([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 600], 4, False),
    ([3, 600], 0, False),
    ([5, 6, 7, 8, 9, 10, 11, 600], None, True),
    ([600], None, False),
    ([44, 45, 46, 47, 48, 49, 600], 2, True),
]
SENTINEL = 7.0  # the cache before prefill: what no prompt writes stays this


@pytest.fixture(scope="module")
def bundled():
    model, _ = load()
    return model


def prompts_at(slots) -> list[Prompt]:
    """PROMPTS placed at (group, row) slots, with their positions and masks."""
    return [
        Prompt(g, w, ids, *context_inputs(len(ids), mask_position, unidirectional))
        for (g, w), (ids, mask_position, unidirectional) in zip(slots, PROMPTS, strict=True)
    ]


def fresh_rows(model) -> Rows:
    rows = Rows(model, groups=3, width=2, max_length=16)
    for buffer in [*rows.cache.k, *rows.cache.v]:
        buffer.fill_(SENTINEL)
    return rows


SLOTS = [(0, 1), (2, 0), (1, 1), (0, 0), (2, 1), (1, 0)]


def alone(model, prompt: Prompt) -> tuple[torch.Tensor, KVCache]:
    """The reference: the prompt alone through the model's own KV cache ([1, n]), logits at its end."""
    n = len(prompt.ids)
    cache = KVCache.for_model(model, 1, n)
    with torch.no_grad():
        logits = model(torch.tensor([prompt.ids]), prompt.positions[None], prompt.mask[None, None], cache)
    return logits[0, -1], cache


@pytest.mark.parametrize("max_tokens", [4096, 16, 1])  # one forward; several; every prompt alone
def test_batched_prefill_equals_each_prompt_alone(bundled, max_tokens):
    prompts = prompts_at(SLOTS)
    rows = fresh_rows(bundled)
    batched = rows.prefill_many(prompts, max_tokens=max_tokens)
    written = torch.zeros(3, 16, 2, dtype=torch.bool)  # [G, T, W]
    for p, got in zip(prompts, batched, strict=True):
        expected, cache = alone(bundled, p)
        assert_model_close(got, expected, bundled.config)
        n = len(p.ids)
        written[p.group, :n, p.row] = True
        for layer, (k, v) in enumerate(zip(rows.cache.k, rows.cache.v, strict=True)):
            for buffer, reference in ((k, cache.k[layer]), (v, cache.v[layer])):
                # row w's position t at column t * W + w
                assert_model_close(buffer[p.group, :, p.row : 2 * n : 2], reference[0], bundled.config)
        seen = torch.zeros(16, 2, dtype=torch.bool)
        seen[:n, p.row] = True
        assert torch.equal(rows.visible[p.group, p.row], seen)  # its prompt, nothing else
    columns = written.view(3, 1, 32, 1)  # padding and every other column: untouched
    for buffer in [*rows.cache.k, *rows.cache.v]:
        assert bool((buffer.masked_select(~columns) == SENTINEL).all())


def test_one_prompt_alone_through_rows_equals_the_batch(bundled):
    prompts = prompts_at(SLOTS)
    one_by_one, batched = fresh_rows(bundled), fresh_rows(bundled)
    for got, p in zip(batched.prefill_many(prompts), prompts, strict=True):
        assert_model_close(got, one_by_one.prefill(*p), bundled.config)
    assert torch.equal(batched.visible, one_by_one.visible)
    for a, b in zip(
        [*batched.cache.k, *batched.cache.v], [*one_by_one.cache.k, *one_by_one.cache.v], strict=True
    ):
        assert_model_close(a, b, bundled.config)


def test_all_logits_equal_a_forward_without_cache(bundled):
    prompts = prompts_at(SLOTS)
    logits = fresh_rows(bundled).prefill_many(prompts, all_logits=True)
    for p, got in zip(prompts, logits, strict=True):
        with torch.no_grad():
            expected = bundled(torch.tensor([p.ids]), p.positions[None], p.mask[None, None])[0]
        assert got.shape == expected.shape
        assert_model_close(got, expected, bundled.config)


def test_prompts_are_grouped_by_length_within_the_budget():
    assert prefill_batches([5, 12, 2, 8, 1, 7], 24) == [[1, 3], [5, 0, 2], [4]]
    assert prefill_batches([5, 12, 2], 4096) == [[1, 0, 2]]
    assert prefill_batches([30, 3], 10) == [[0], [1]]  # longer than the budget: alone
    assert prefill_batches([], 10) == []


def test_bad_prompts_are_refused(bundled):
    rows = Rows(bundled, 1, 2, 8)
    ids = [1, 2, 600]
    with pytest.raises(ValueError, match="does not fit rows of 8 positions"):
        rows.prefill(0, 0, list(range(9)), *context_inputs(9, None))
    with pytest.raises(ValueError, match="twice"):
        rows.prefill_many([Prompt(0, 1, ids, *context_inputs(3, None))] * 2)
    with pytest.raises(ValueError, match=r"bool mask \[3, 3\]"):
        rows.prefill(0, 0, ids, torch.arange(3), torch.zeros(3, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ users


def greedy() -> BaseStrategy:
    return BaseStrategy(1, top_k=1, end_tokens=[END])


def sampled(seed: int, n: int = 1) -> BaseStrategy:
    return BaseStrategy(n, top_k=40, end_tokens=[END], generator=torch.Generator().manual_seed(seed))


def beams() -> BeamSearchStrategy:
    return BeamSearchStrategy(1, 3, end_tokens=[END], deterministic=True, no_repeat_ngram_size=2)


MAKERS = [
    lambda: Request(PROMPTS[0][0], greedy(), 7),
    lambda: Request(PROMPTS[1][0], sampled(5, n=2), 9, mask_position=4),
    lambda: Request(PROMPTS[2][0], beams(), 3, mask_position=0),
    lambda: Request(PROMPTS[3][0], sampled(6), 6, unidirectional=True),
    lambda: Request(PROMPTS[5][0], greedy(), 5, mask_position=2, unidirectional=True),
]


def outputs(request: Request) -> list:
    return [(o.ids, o.finish_reason) for o in request.outputs]


@pytest.mark.parametrize("max_prefill_tokens", [4096, 12])
def test_requests_joining_together_get_what_they_get_alone(tiny_model, max_prefill_tokens):
    model, _ = tiny_model
    alone = []
    for make in MAKERS:
        (request,) = Engine(model, groups=2, width=3, max_length=40).run([make()])
        alone.append(outputs(request))
    engine = Engine(model, groups=2, width=3, max_length=40, max_prefill_tokens=max_prefill_tokens)
    requests = [make() for make in MAKERS]
    for request in requests:
        engine.submit(request)
    engine.step()  # the first three fill both groups and are prefilled together (12 tokens: in two forwards)
    assert all(r.steps == 2 for r in requests[:3]) and all(r.steps == 0 for r in requests[3:])
    while engine.busy:
        engine.step()
    assert [outputs(r) for r in requests] == alone


def test_a_failing_prompt_fails_alone(tiny_model):
    model, _ = tiny_model
    (good,) = Engine(model, groups=3, width=1, max_length=40).run([MAKERS[0]()])
    engine = Engine(model, groups=3, width=1, max_length=40)
    requests = [MAKERS[0](), Request([5, 10**6, 600], greedy(), 4), MAKERS[0]()]  # an id past the vocabulary
    for request in requests:
        engine.submit(request)
    while engine.busy:
        engine.step()
    assert isinstance(requests[1].error, IndexError) and requests[1].outputs == []
    assert outputs(requests[0]) == outputs(requests[2]) == outputs(good)
    assert all(len(free) == 1 for free in engine._free)


def test_rows_freed_at_the_first_token_are_taken_in_the_same_step(tiny_model):
    model, _ = tiny_model
    engine = Engine(model, groups=1, width=1, max_length=40)
    first, second = Request(PROMPTS[0][0], greedy(), 1), Request(PROMPTS[1][0], greedy(), 4)
    engine.submit(first)
    engine.submit(second)
    engine.step()
    assert first.done and second.steps == 2  # its first token from the prefill, one decode step


def beams_of(batch: int) -> BeamSearchStrategy:
    return BeamSearchStrategy(batch, 3, end_tokens=[END], deterministic=True, no_repeat_ngram_size=2)


STRATEGIES = {
    "greedy": lambda batch: BaseStrategy(batch, top_k=1),
    "beams": beams_of,
    "sampled": lambda batch: sampled(3, n=batch),
}


@pytest.mark.parametrize("kind", list(STRATEGIES))
def test_generate_batch_equals_each_context_alone(tiny_model, kind):
    model, _ = tiny_model
    strategy = STRATEGIES[kind]
    contexts = [ids for ids, _, uni in PROMPTS if not uni]
    masks = [m for _, m, uni in PROMPTS if not uni]
    batched = generate(model, contexts, strategy(len(contexts)), 5, masks, max_prefill_tokens=12)
    assert batched == generate(model, contexts, strategy(len(contexts)), 5, masks)
    if kind == "sampled":
        return  # one generator draws for the whole batch: alone, a context gets other draws
    for context, mask, result in zip(contexts, masks, batched, strict=True):
        assert result == generate(model, [context], strategy(1), 5, [mask])[0]
