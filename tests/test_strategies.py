"""Tests for glm.decoding.strategies against hand-computed and brute-force expectations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from glm.cpu_matmul import native, unique_argmax
from glm.decoding.strategies import (
    FILTER_VALUE,
    BaseStrategy,
    BeamSearchStrategy,
    filter_logits,
    sample_without_replacement,
)

P4 = [0.5, 0.3, 0.15, 0.05]


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Indices that survived filtering, per row."""
    return [[j for j, v in enumerate(row) if v > FILTER_VALUE] for row in logits.tolist()]


# ---------------------------------------------------------------- filtering and sampling


@pytest.mark.parametrize(
    ("top_p", "expected"), [(0.45, [0]), (0.7, [0, 1]), (0.9, [0, 1, 2]), (0.0, [0, 1, 2, 3])]
)
def test_top_p_keeps_first_token_crossing_threshold(top_p, expected):
    logits = torch.tensor([P4]).log()
    assert kept(filter_logits(logits, top_p=top_p)) == [expected]


def test_top_p_is_per_row():
    rows = [P4, P4[::-1], [0.7, 0.1, 0.1, 0.1]]
    out = filter_logits(torch.tensor(rows).log(), top_p=0.6)
    assert kept(out) == [[0, 1], [2, 3], [0]]
    # Kept logits are untouched.
    assert torch.equal(out[0, :2], torch.tensor(P4[:2]).log())


def test_top_k_keeps_ties_and_clamps():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    assert kept(filter_logits(logits, top_k=2)) == [[0, 1, 2]]
    assert kept(filter_logits(logits, top_k=1)) == [[0]]
    assert kept(filter_logits(logits, top_k=0)) == [[0, 1, 2, 3, 4]]
    assert kept(filter_logits(logits, top_k=50)) == [[0, 1, 2, 3, 4]]


def test_top_k_applies_before_top_p():
    # After top-2 the renormalised probs are 4/7, 3/7, so top_p=0.5 keeps one token;
    # top-p first would keep two.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [[0]]


def test_filter_does_not_modify_input():
    logits = torch.tensor([P4]).log()
    before = logits.clone()
    filter_logits(logits, top_k=1, top_p=0.3)
    assert torch.equal(logits, before)


def test_probs_temperature_and_invalid_slices():
    s = BaseStrategy(1, temperature=0.5, top_k=0)
    probs = s.next_token_probs(torch.tensor([[[2.0, 1.0, 0.0]]]))
    z = math.exp(4) + math.exp(2) + 1  # softmax([2, 1, 0] / 0.5)
    assert torch.allclose(probs, torch.tensor([[math.exp(4) / z, math.exp(2) / z, 1 / z]]))

    s = BaseStrategy(1, invalid_slices=[slice(0, 1)], top_k=0)
    probs = s.next_token_probs(torch.tensor([[[5.0, 0.0, 0.0]]], dtype=torch.bfloat16))
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, torch.tensor([[0.0, 0.5, 0.5]]))


def test_sampling_frequencies_after_top_p():
    n = 4000
    s = BaseStrategy(n, top_k=0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    logits = torch.tensor(P4).log().expand(n, 1, 4)
    tokens, source = s.forward(logits, torch.zeros(n, 1, 1, dtype=torch.long))
    assert source is None and tokens.shape == (n, 1, 2)
    counts = torch.bincount(tokens[:, 0, 1], minlength=4).float() / n
    assert counts[2:].sum() == 0  # filtered tokens are never sampled
    assert abs(counts[0] - 0.5 / 0.8) < 0.04  # renormalised over the kept two


def test_sampling_is_reproducible_with_generator():
    logits = torch.randn(3, 1, 50, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(3, 1, 2, dtype=torch.long)
    outs = [
        BaseStrategy(3, top_k=0, generator=torch.Generator().manual_seed(7)).forward(logits, tokens)[0]
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])


def onehot_logits(choices: list[int], vocab: int = 4) -> torch.Tensor:
    """Logits [B, 1, V] making each row's choice certain."""
    logits = torch.full((len(choices), 1, vocab), -100.0)
    logits[torch.arange(len(choices)), 0, torch.tensor(choices)] = 100.0
    return logits


def test_end_token_then_pad_and_is_done():
    s = BaseStrategy(2, end_tokens=[3])
    tokens = torch.tensor([[[1, 2]], [[2, 1]]])
    tokens, _ = s.forward(onehot_logits([3, 0]), tokens)
    assert not s.is_done
    tokens, _ = s.forward(onehot_logits([0, 0]), tokens)
    assert tokens[:, 0, -1].tolist() == [-1, 0]  # the finished row is padded
    assert not s.is_done
    tokens, _ = s.forward(onehot_logits([0, 3]), tokens)
    assert tokens[:, 0, -1].tolist() == [-1, 3]
    assert s.is_done
    assert s.finalize(tokens) == [[[1, 2, 3]], [[2, 1, 0, 0, 3]]]
    assert not s.is_done  # reset for reuse


def test_sample_without_replacement_distribution():
    scores = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).log().expand(20000, 5)  # last one impossible
    idx = sample_without_replacement(scores, 4, torch.Generator().manual_seed(0))
    assert all(len(set(row)) == 4 for row in idx.tolist())
    assert (idx != 4).all()  # -inf only when needed, and here it is not
    first = torch.bincount(idx[:, 0], minlength=5).float() / len(idx)
    assert torch.allclose(first, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.02)
    # More draws than possible candidates: no crash, the impossible one comes last.
    assert (sample_without_replacement(scores[:10], 5)[:, -1] == 4).all()


# ---------------------------------------------------------------- beam search on toy models

V = 5
END = (3, 4)


def decode(strategy, table, prompts, steps):
    """Toy decoding loop: next-token logits depend only on the last token. Checks source indices each step."""
    tokens = torch.tensor(prompts)[:, None, :]  # [B, 1, P]
    for step in range(steps):
        logits = table[tokens[..., -1]]  # [B, nb, V]
        old = tokens
        tokens, source = strategy.forward(logits, tokens)
        assert tokens.shape == (len(prompts), strategy.num_beams, old.shape[-1] + 1)
        assert source.shape == (len(prompts), strategy.num_beams)
        if step == 0:
            assert (source == 0).all()
        rows = torch.arange(len(prompts))[:, None]
        assert torch.equal(tokens[..., :-1], old[rows, source])
        if strategy.is_done:
            break
    return strategy.finalize(tokens)


def brute_force(table, prompt, max_gen, length_penalty=1.0, min_gen=0, end=END):
    """All sequences the search can output within max_gen steps, best first, by GNMT-penalised score.

    Finished ones end with their first end token; unfinished ones have exactly max_gen tokens.
    """
    results = []
    for g in range(1, max_gen + 1):
        for gen in itertools.product(range(V), repeat=g):
            if any(t in end for t in gen[:-1]):
                continue
            if g < max_gen and gen[-1] not in end:
                continue
            seq, score = list(prompt), 0.0
            for step, t in enumerate(gen):
                logits = table[seq[-1]].double().clone()
                if step < min_gen:
                    logits[list(end)] = -math.inf  # renormalised over the allowed tokens
                score += logits.log_softmax(-1)[t].item()
                seq.append(t)
            results.append((score / ((5 + len(seq)) / 6) ** length_penalty, seq))
    results.sort(key=lambda r: -r[0])
    return results


def assert_top_beams(beams, ranked, k):
    """`beams` are k distinct sequences whose brute-force scores are the top k (any order among exact ties:
    sequences with the same transitions in another order score the same)."""
    score = {tuple(seq): s for s, seq in ranked}
    assert len(beams) == k and len({tuple(b) for b in beams}) == k
    got = [score[tuple(b)] for b in beams]
    assert got == pytest.approx([s for s, _ in ranked[:k]], abs=1e-5)


def random_table(seed: int) -> torch.Tensor:
    return 2 * torch.randn(V, V, generator=torch.Generator().manual_seed(seed))


def test_beam_search_matches_brute_force():
    # 27 beams keep every one of the 3**2 non-end prefixes and all their candidates for 3 steps, and the
    # 2 + 6 + 18 finished beams never fill the list, so the search is exact: its 27 outputs must be the
    # brute-force top 27 among finished sequences and the unfinished ones added by consider_end.
    table = random_table(0)
    prompts = [[0, 1], [2, 0]]
    s = BeamSearchStrategy(2, 27, consider_end=True, end_tokens=END, deterministic=True)
    out = decode(s, table, prompts, steps=3)
    for prompt, beams in zip(prompts, out, strict=True):
        assert_top_beams(beams, brute_force(table, prompt, 3), 27)


def length_penalty_table() -> torch.Tensor:
    probs = torch.full((V, V), 0.2)
    probs[0] = torch.tensor([0.01, 0.45, 0.03, 0.5, 0.01])  # after the prompt: end now, or 1 ...
    probs[1] = torch.tensor([0.025, 0.025, 0.025, 0.025, 0.9])  # ... which almost surely ends next
    return probs.log()


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_length_penalty_changes_winner(length_penalty):
    table = length_penalty_table()
    s = BeamSearchStrategy(1, 27, length_penalty, consider_end=True, end_tokens=END, deterministic=True)
    best = decode(s, table, [[0]], steps=3)[0][0]
    ranked = brute_force(table, [0], 3, length_penalty)
    assert ranked[0][0] > ranked[1][0] + 1e-4  # a unique winner
    assert best == ranked[0][1]
    assert best == ([0, 1, 4] if length_penalty == 3.0 else [0, 3])


def test_min_gen_length_blocks_early_end():
    table = torch.zeros(V, V)
    table[:, 3] = 3.0  # ending is by far the most likely next token everywhere
    prompt = [0, 1]
    s = BeamSearchStrategy(1, 3, consider_end=True, end_tokens=END, deterministic=True)
    assert decode(s, table, [prompt], steps=5)[0][0] == [0, 1, 3]
    s = BeamSearchStrategy(1, 3, consider_end=True, end_tokens=END, min_gen_length=2, deterministic=True)
    out = decode(s, table, [prompt], steps=5)[0]
    assert len(out) == 3
    for beam in out:
        gen = beam[len(prompt) :]
        assert not any(t in END for t in gen[:2])  # at least two ordinary tokens first
        assert gen[-1] in END


def test_min_gen_length_matches_brute_force():
    table = random_table(3)
    s = BeamSearchStrategy(1, 27, consider_end=True, end_tokens=END, min_gen_length=1, deterministic=True)
    out = decode(s, table, [[1]], steps=3)[0]
    assert_top_beams(out, brute_force(table, [1], 3, min_gen=1), 27)
    assert all(len(beam) >= 3 for beam in out)


def bigram_table() -> torch.Tensor:
    probs = torch.full((V, V), 0.025)
    probs[1, 2] = probs[2, 1] = 0.9  # 1 -> 2 -> 1 -> 2 ...
    probs[0, 0] = probs[3, 3] = probs[4, 4] = 0.9
    return probs.log()


def generated_ngrams(beam, prompt_len, n):
    """The n-grams ending in a generated token."""
    return [tuple(beam[i - n + 1 : i + 1]) for i in range(prompt_len, len(beam))]


def test_no_repeat_bigram():
    prompt = [1, 2, 1]
    table = bigram_table()
    plain = decode(BeamSearchStrategy(1, 2, deterministic=True), table, [prompt], steps=6)[0]
    assert plain[0] == [*prompt, 2, 1, 2, 1, 2, 1]  # repeats without the ban

    s = BeamSearchStrategy(1, 2, no_repeat_ngram_size=2, deterministic=True)
    out = decode(s, table, [prompt], steps=6)[0]
    assert len(out) == 2
    for beam in out:
        assert len(beam) == len(prompt) + 6
        bigrams = generated_ngrams(beam, len(prompt), 2)
        assert len(set(bigrams)) == len(bigrams)
    # The prompt's bigrams (1, 2) and (2, 1) are not banned: the best beam starts by repeating them.
    assert out[0][len(prompt) : len(prompt) + 2] == [2, 1]


def test_no_repeat_unigram():
    prompt = [0, 0]
    table = bigram_table()
    s = BeamSearchStrategy(2, 2, no_repeat_ngram_size=1, deterministic=True)
    out = decode(s, table, [prompt, [3, 1]], steps=4)
    for p, beams in zip([prompt, [3, 1]], out, strict=True):
        assert len(beams) == 2
        for beam in beams:
            gen = beam[len(p) :]
            assert len(gen) == 4 and len(set(gen)) == 4
    assert out[0][0][2] == 0  # a prompt token may still be generated once

    # Once every token has been generated the beams have nowhere to go: they die and the element is done.
    s = BeamSearchStrategy(1, 1, no_repeat_ngram_size=1, deterministic=True)
    tokens = torch.tensor([[[0]]])
    for _ in range(V):
        tokens, _ = s.forward(table[tokens[..., -1]], tokens)
    assert sorted(tokens[0, 0, 1:].tolist()) == list(range(V)) and not s.is_done
    tokens, _ = s.forward(table[tokens[..., -1]], tokens)
    assert s.is_done
    assert s.finalize(tokens) == [[]]


def test_too_few_continuations_are_padded():
    # V=3 with two end tokens: the first step has one possible continuation for two beams.
    table = torch.tensor([[2.0, 0.0, 0.0]]).expand(3, 3)  # continuing beats ending
    s = BeamSearchStrategy(1, 2, end_tokens=(1, 2), deterministic=True)
    tokens, source = s.forward(table[None, None, 0], torch.tensor([[[0]]]))
    assert tokens.tolist() == [[[0, 0], [0, 0]]] and source.tolist() == [[0, 0]]
    assert s.cached_beam_scores[0, 1] == -math.inf  # the padding beam is dead
    tokens, source = s.forward(table[tokens[..., -1]], tokens)
    assert source.tolist() == [[0, 0]]  # the dead beam never yields a continuation
    assert s.finalize(tokens) == [[[0, 0, 0]]]  # dead beams are left out


def test_stochastic_with_few_valid_candidates():
    # Only tokens 0 and 1 are allowed; the original's multinomial needed 4 non-zero candidates here.
    table = random_table(5)
    gen = torch.Generator().manual_seed(0)
    s = BeamSearchStrategy(2, 2, invalid_slices=[slice(2, None)], generator=gen)
    out = decode(s, table, [[0], [1]], steps=4)
    for beams in out:
        assert len(beams) == 2
        assert all(t < 2 for beam in beams for t in beam)


def test_stochastic_beam_search_reproducible():
    table = random_table(6)
    outs = []
    for _ in range(2):
        s = BeamSearchStrategy(
            2, 3, consider_end=True, end_tokens=END, generator=torch.Generator().manual_seed(11)
        )
        outs.append(decode(s, table, [[0, 1], [2, 2]], steps=6))
    assert outs[0] == outs[1]
    assert all(1 <= len(beams) <= 3 for beams in outs[0])


def test_end_beams_ordering_and_reset():
    s = BeamSearchStrategy(1, 2)
    s._add_end_beams(-1.0, [1, 2], 0)  # penalised by (5 + 2) / 6
    s._add_end_beams(-1.0, [3, 4], 0)  # same penalised score: goes first
    s._add_end_beams(-0.5, [5, 6], 0)  # best, pushes the worst out
    assert s.end_beams[0] == [[5, 6], [3, 4]]
    assert s.finalize(torch.zeros(1, 1, 2, dtype=torch.long)) == [[[0, 0]]]  # consider_end=False: live beams
    assert s.end_beams == [[]]


def test_done_element_stops_and_ignores_live_beams():
    # Ending is certain right away: both end-token beams finish at step 1 and beat any live beam.
    table = torch.full((V, V), -20.0)
    table[:, 3] = table[:, 4] = 0.0
    s = BeamSearchStrategy(1, 2, consider_end=True, end_tokens=END, deterministic=True)
    tokens, _ = s.forward(table[None, None, 0], torch.tensor([[[0]]]))
    assert s.is_done
    assert sorted(s.finalize(tokens)[0]) == [[0, 3], [0, 4]]


# ---------------------------------------------------------------- batches: padding and per-element generators


def test_left_padding_changes_nothing_given_context_lengths():
    # A padded element (context_lengths says where its own tokens start) gets what it gets alone: the length
    # penalty counts its own length and its n-gram keys never include the padding.
    table = random_table(3)
    prompts = [[1, 2, 0, 1], [2, 1]]

    def strategy(batch):
        return BeamSearchStrategy(
            batch, 2, length_penalty=2.0, consider_end=True, end_tokens=END, no_repeat_ngram_size=2,
            deterministic=True,
        )  # fmt: skip

    pad = 9  # a token id that never occurs, so padding would show in any key or length it leaks into
    padded = torch.tensor([prompts[0], [pad, pad, *prompts[1]]])[:, None, :]  # [2, 1, 4]
    s, tokens = strategy(2), padded
    for _ in range(6):
        tokens, _ = s.forward(table[tokens[..., -1].clamp(max=V - 1)], tokens, [4, 2])
        if s.is_done:
            break
    batched = s.finalize(tokens)
    assert batched[0] == decode(strategy(1), table, prompts[:1], 6)[0]
    assert [beam[2:] for beam in batched[1]] == decode(strategy(1), table, prompts[1:], 6)[0]


def test_per_element_generators_make_sampling_batch_invariant():
    logits = torch.randn(3, 1, 50, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(3, 1, 1, dtype=torch.long)

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batched = BaseStrategy(3, top_k=0, generator=generators([4, 5, 6])).forward(logits, tokens)[0]
    for b, seed in enumerate([4, 5, 6]):
        alone = BaseStrategy(1, top_k=0, generator=generators([seed])).forward(logits[b : b + 1], tokens[:1])[
            0
        ]
        assert torch.equal(batched[b], alone[0])
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    both = sample_without_replacement(scores, 5, generators([7, 8]))
    assert torch.equal(both[1], sample_without_replacement(scores[1:], 5, generators([8]))[0])


def test_top_k_1_is_the_argmax_and_draws_among_tied_maxima():
    logits = torch.tensor([[[0.5, 3.0, -1.0, 2.9]], [[1.0, 1.0, 0.0, 0.5]]])  # row 1: a tie
    tokens = torch.zeros(2, 1, 1, dtype=torch.long)
    firsts = set()
    for seed in range(40):
        strategy = BaseStrategy(2, top_k=1, generator=torch.Generator().manual_seed(seed))
        out, _ = strategy.forward(logits, tokens)
        assert out[0, 0, -1] == 1
        firsts.add(int(out[1, 0, -1]))
    assert firsts == {0, 1}  # never 2 or 3: only the tied maxima are drawn
    strategy = BaseStrategy(1, top_k=1, invalid_slices=[slice(1, 2)])
    out, _ = strategy.forward(logits[:1], tokens[:1])
    assert out[0, 0, -1] == 3  # the invalid maximum is skipped


def reference_unique_argmax(scores: torch.Tensor, skip, floor: float) -> torch.Tensor | None:
    """The torch ops the native pass replaces: argmax where unique, finite and above `floor`."""
    scores = scores.clone()
    for part in skip:
        scores[:, part] = float("-inf")
    best, index = scores.max(dim=-1)
    unique = (scores == best[:, None]).sum(dim=-1) == 1
    if not bool((unique & (best > floor) & ~best.isnan()).all()):
        return None
    return index


@pytest.mark.skipif(native() is None, reason="no AVX2 or no compiler: the torch ops decide")
@pytest.mark.parametrize("case", ["random", "tie", "nan", "skipped max", "all below floor", "skipped tie"])
def test_the_native_unique_argmax_agrees_with_torch(case):
    generator = torch.Generator().manual_seed(len(case))
    scores = torch.randn(3, 1000, generator=generator)
    skip: list[slice] = []
    if case == "tie":
        scores[1, 17] = scores[1, 900] = scores[1].max() + 1
    if case == "nan":
        scores[2, 5] = float("nan")
    if case == "skipped max":
        scores[0, 40] = 100.0
        skip = [slice(30, 50), slice(990, None)]
    if case == "all below floor":
        scores[1] = FILTER_VALUE - 1
    if case == "skipped tie":  # the tie lies in a skipped range: the maximum is unique
        scores[2, 3] = scores[2, 4] = 100.0
        skip = [slice(0, 10)]
    got = unique_argmax(scores, skip, FILTER_VALUE)
    expected = reference_unique_argmax(scores, skip, FILTER_VALUE)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert torch.equal(got, expected)
    assert (expected is None) == (case in ("tie", "nan", "all below floor"))
