"""The decoding engine: rows and masks against full recomputation, continuous batching equal to each request
alone (greedy, seeded sampling, beam search with their own budgets), stop ids and strings, log-probs,
penalties, cancellation and the bounded queue."""

from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from torch import nn
from torch._dynamo.utils import counters, get_static_address_type

from glm.decoding.engine import Engine
from glm.decoding.requests import Penalties, QueueFull, Request
from glm.decoding.rows import held_tensors
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.model import GLM, init_random_weights
from glm.query import build_inputs

END = 601
CONTEXTS = [[20, 30, 40, 50, 600], [7, 8, 9, 10, 11, 12, 13, 600], [3, 600]]
MASKS = [None, 4, 0]


def full_logits(model, context, generated, mask_position):
    """Next-token logits [V] after context + generated, recomputed from scratch (no cache)."""
    n = len(context) + len(generated)
    inputs = build_inputs([context], len(generated) + 1, [mask_position])
    with torch.no_grad():
        logits = model(
            torch.tensor([[*context, *generated]]),
            inputs.position_ids[:, :n],
            inputs.attention_mask[:, :, :n, :n],
        )
    return logits[0, -1]


def greedy(max_new: int = 6) -> BaseStrategy:
    return BaseStrategy(1, top_k=1, end_tokens=[END])


def sampled(seed: int, n: int = 1) -> BaseStrategy:
    return BaseStrategy(n, top_k=40, end_tokens=[END], generator=torch.Generator().manual_seed(seed))


def beams(budget_seed: int | None = None, deterministic: bool = True) -> BeamSearchStrategy:
    generator = None if budget_seed is None else torch.Generator().manual_seed(budget_seed)
    return BeamSearchStrategy(
        1, 3, end_tokens=[END], deterministic=deterministic, no_repeat_ngram_size=2, generator=generator
    )


def run_alone(model, make_request, **engine_args) -> list:
    engine = Engine(model, **{"groups": 2, "width": 3, "max_length": 40, **engine_args})
    (request,) = engine.run([make_request()])
    return [(o.ids, o.finish_reason) for o in request.outputs]


def test_greedy_equals_full_recomputation(tiny_model):
    model, _ = tiny_model
    for context, mask_position in zip(CONTEXTS, MASKS, strict=True):
        engine = Engine(model, groups=1, width=1, max_length=32)
        (request,) = engine.run([Request(context, greedy(), 8, mask_position=mask_position, logprobs=2)])
        generated: list[int] = []
        for step, output in enumerate(request.outputs[0].logprobs):
            logits = full_logits(model, context, generated, mask_position)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            assert output.token == int(logits.argmax())
            assert output.logprob == pytest.approx(float(logprobs.max()), abs=1e-5)
            top = torch.topk(logprobs, 2)
            assert [t for t, _ in output.top] == top.indices.tolist(), step
            generated.append(output.token)
        assert generated == request.outputs[0].ids


def test_beam_search_through_the_mask_equals_recomputation(tiny_model):
    """Beams reordered by mask rows (no cache copy) give what recomputing every beam from scratch gives."""
    model, _ = tiny_model
    context = CONTEXTS[0]
    strategy = beams()
    tokens = torch.tensor([[context]])
    for _ in range(6):
        logits = torch.stack(
            [full_logits(model, context, row[len(context) :], None) for row in tokens[0].tolist()]
        )
        tokens, _ = strategy.forward(logits[None], tokens)
        if strategy.is_done:
            break
    expected = [(beam[len(context) :], None) for beam in strategy.finalize(tokens)[0]]
    got = run_alone(model, lambda: Request(context, beams(), 6))
    assert [ids for ids, _ in got] == [ids[:-1] if ids[-1:] == [END] else ids for ids, _ in expected]
    assert len({tuple(ids) for ids, _ in got}) == 3


def test_continuous_batch_equals_each_request_alone(tiny_model):
    """Greedy, seeded sampling (n = 2), deterministic and stochastic beam search with different budgets,
    some joining while others run, in 2 groups of 3 rows: each gets exactly what it gets alone."""
    model, _ = tiny_model
    makers = [
        lambda: Request(CONTEXTS[0], greedy(), 7),
        lambda: Request(CONTEXTS[1], sampled(5, n=2), 9, mask_position=4),
        lambda: Request(CONTEXTS[2], beams(), 3, mask_position=0),
        lambda: Request(CONTEXTS[0], beams(11, deterministic=False), 5),
        lambda: Request(CONTEXTS[1], sampled(6), 4),
    ]
    alone = [run_alone(model, make) for make in makers]
    engine = Engine(model, groups=2, width=3, max_length=40)
    requests = [make() for make in makers]
    engine.submit(requests[0])
    engine.submit(requests[1])
    engine.step()
    engine.step()  # the others join a running batch
    for request in requests[2:]:
        engine.submit(request)
    while engine.busy:
        engine.step()
    for request, expected in zip(requests, alone, strict=True):
        assert [(o.ids, o.finish_reason) for o in request.outputs] == expected
    assert all(len(free) == 3 for free in engine._free)  # every row given back


def test_budgets_end_tokens_and_stop_ids(tiny_model):
    model, _ = tiny_model
    (request,) = Engine(model, 1, 1, 32).run([Request(CONTEXTS[1], sampled(3), 8)])
    (output,) = request.outputs
    assert len(output.ids) == 8 and output.finish_reason == "length"
    # the first sampled token not seen before, as a stop id: the same draws end before it
    k = next(k for k in range(1, 8) if output.ids[k] not in output.ids[:k])
    strategy = sampled(3)
    strategy.end_tokens = (END, output.ids[k])
    (request,) = Engine(model, 1, 1, 32).run([Request(CONTEXTS[1], strategy, 8)])
    assert request.outputs[0].ids == output.ids[:k] and request.outputs[0].finish_reason == "stop"


def test_stop_strings_cut_the_text(tiny_model):
    model, tokenizer = tiny_model
    (plain,) = Engine(model, 1, 1, 40, detokenize=tokenizer.detokenize).run(
        [Request(CONTEXTS[0], greedy(), 10)]
    )
    text = tokenizer.detokenize(plain.outputs[0].ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    engine = Engine(model, 1, 1, 40, detokenize=tokenizer.detokenize)
    (request,) = engine.run([Request(CONTEXTS[0], greedy(), 10, stop_strings=(stop, "\x00never"))])
    (output,) = request.outputs
    assert output.text == text[: text.find(stop)] and output.finish_reason == "stop"
    assert tokenizer.detokenize(output.ids).startswith(output.text)
    assert len(output.ids) <= len(plain.outputs[0].ids)


def test_penalties_by_hand(tiny_model):
    model, _ = tiny_model
    engine = Engine(model, 1, 2, 32)
    request = Request([5, 6, 600], BaseStrategy(2), 4, penalties=Penalties(2.0, 0.5, 0.25))
    request._counts = torch.zeros(2, 8)
    request._counts[0, 1] = 3  # row 0 generated token 1 three times
    request._counts[1, 2] = 1
    request.prompt = [4]  # token 4 seen in the prompt (repetition penalty only)
    logits = torch.tensor([[1.0, 2.0, -2.0, 0.0, 4.0, 0.0, 0.0, 0.0]] * 2)
    got = engine._penalize(request, logits)
    row0 = [1.0, 2.0 / 2 - 3 * 0.25 - 0.5, -2.0, 0.0, 4.0 / 2, 0.0, 0.0, 0.0]
    row1 = [1.0, 2.0, -2.0 * 2 - 0.25 - 0.5, 0.0, 4.0 / 2, 0.0, 0.0, 0.0]
    torch.testing.assert_close(got, torch.tensor([row0, row1]))


def test_frequency_penalty_changes_greedy_repeats(tiny_model):
    model, _ = tiny_model
    (plain,) = Engine(model, 1, 1, 40).run([Request(CONTEXTS[2], greedy(), 12)])
    ids = plain.outputs[0].ids
    assert len(set(ids)) < len(ids), "the untrained model repeats itself under greedy decoding"
    (penalized,) = Engine(model, 1, 1, 40).run(
        [Request(CONTEXTS[2], greedy(), 12, penalties=Penalties(frequency=100.0))]
    )
    assert len(set(penalized.outputs[0].ids)) == len(penalized.outputs[0].ids)  # no token twice


def test_cancel_frees_rows_and_queue_is_bounded(tiny_model):
    model, _ = tiny_model
    engine = Engine(model, groups=1, width=1, max_length=40, max_queue=1)
    first = Request(CONTEXTS[0], greedy(), 20)
    engine.submit(first)
    engine.step()
    engine.submit(Request(CONTEXTS[1], greedy(), 2))  # waits: the only row is taken
    with pytest.raises(QueueFull):
        engine.submit(Request(CONTEXTS[2], greedy(), 2))
    engine.cancel(first)
    while engine.busy:
        engine.step()
    assert first.outputs == [] and first.steps < 20
    with pytest.raises(ValueError, match="exceeds the engine's 40 positions"):
        engine.submit(Request(CONTEXTS[0], greedy(), 40))
    with pytest.raises(ValueError, match="needs 3 rows"):
        engine.submit(Request(CONTEXTS[0], beams(), 4))


def test_beam_search_streams_only_settled_tokens(tiny_model):
    model, _ = tiny_model
    seen: list[list[int]] = []
    request = Request(CONTEXTS[0], beams(), 6, on_step=lambda r: seen.append(r.settled()))
    Engine(model, 1, 3, 40).run([request])
    best = request.outputs[0].ids
    for settled in seen:  # each snapshot is a prefix of the next and of the final best beam
        assert best[: len(settled)] == settled
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(seen))


def test_cuda_graphs_step_warms_up_eagerly_marks_static_and_reports_a_skipped_capture(caplog):
    """--cuda-graphs on the CPU (compiles in ~20 s): the first decode step runs eagerly (every layer prepares
    its kernel outside the compiled region), the cache and the model's tensors are then static, the tokens
    are the eager engine's, and the capture torch.compile skips (a CPU graph) is counted and logged once."""
    model = init_random_weights(GLM(tiny_config(num_layers=1, vocab_size=40)), std=1.0).eval()

    def requests() -> list[Request]:
        return [
            Request([5, 6, 7, 8], BaseStrategy(1, top_k=1), 6),
            Request([9, 10], BaseStrategy(1, top_k=1), 4),
        ]

    eager = [r.outputs[0].ids for r in Engine(model, groups=2, width=2, max_length=16).run(requests())]
    assert len({t for ids in eager for t in ids}) > 3  # tokens that can tell a wrong step apart
    engine = Engine(model, groups=2, width=2, max_length=16, cuda_graphs=True)
    batch = requests()
    with caplog.at_level(logging.WARNING, "glm.decoding"):
        frames = counters["frames"]["total"]  # frames torch.compile has traced in this process
        for request in batch:
            engine.submit(request)
        engine.step()  # the prompts and the first decode step: eager
        assert counters["frames"]["total"] == frames
        cache = engine.rows.cache
        for tensor in [*cache.k, *cache.v, model.transformer.layers[0].mlp.dense_h_to_4h.weight]:
            assert get_static_address_type(tensor) == "unguarded"
        while engine.busy:
            engine.step()
    assert counters["frames"]["total"] == frames + 1  # compiled once, never recompiled
    assert [r.outputs[0].ids for r in batch] == eager
    assert engine.cudagraph_skips == 1
    assert [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()] == [
        "--cuda-graphs: torch.compile did not capture the decode step as a CUDA graph (it runs compiled "
        "without one); TORCH_LOGS=cudagraphs names the reason"
    ]


def test_held_tensors_include_what_a_layer_keeps_on_its_kernel():
    layer = nn.Linear(4, 3)
    packed, scales = torch.zeros(6), torch.ones(3)
    layer.kernel = SimpleNamespace(pack=(packed, scales, 64), bits=4, fused=True)  # a kernel's own copy
    found = held_tensors(nn.Sequential(layer))
    assert {id(t) for t in found} == {id(layer.weight), id(layer.bias), id(packed), id(scales)}
