"""Blank-infilling inputs, cached decoding against full recomputation, batching, and fill_blanks."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_model_close

from glm.api import load
from glm.decoding import generate
from glm.decoding.infill import GenerationStats, fill_blanks, prepare_query
from glm.decoding.options import GenerationOptions
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.query import build_inputs
from glm.tokenizer import GLMTokenizer


@pytest.fixture(scope="module")
def bundled():
    return load()


def original_mask(context_length: int, total: int) -> torch.Tensor:
    """GLM-130B generate.py's get_masks_and_position_ids mask, written as the original does."""
    m = torch.ones(1, total, total).tril()
    m[..., : context_length - 1] = 1
    return (m.unsqueeze(1) < 0.5).bool()


def test_inputs_match_the_reference_gmask_example(reference):
    context = reference["tokens"][0, : reference["context_length"]].tolist()
    inputs = build_inputs([context], 4, [None])
    assert torch.equal(inputs.position_ids, reference["position_ids"])
    assert torch.equal(inputs.attention_mask, reference["attention_mask"])


@pytest.mark.parametrize("length,total", [(2, 5), (8, 12), (5, 20)])
def test_mask_equals_the_original_formula(length, total):
    inputs = build_inputs([list(range(length))], total - length, [None])
    assert torch.equal(inputs.attention_mask, original_mask(length, total))


def test_mask_positions_take_the_masks_position():
    # The original's tiny run: a [MASK] at index 3, 7 context tokens, sop, 4 generated tokens.
    inputs = build_inputs([list(range(8))], 4, [3])
    assert inputs.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 3, 3, 3, 3]
    assert torch.equal(inputs.attention_mask, original_mask(8, 12))


class Recording(BaseStrategy):
    """Greedy decoding that keeps the logits it was given."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size, top_k=1)
        self.logits = []

    def forward(self, logits, tokens, context_lengths=None):
        self.logits.append(logits.clone())
        return super().forward(logits, tokens, context_lengths)


@pytest.mark.parametrize("mask_position", [None, 2])
def test_cached_decoding_equals_full_recomputation(tiny_model, mask_position):
    model, _ = tiny_model
    context = [5, 17, 250, 33, 80, 9, 600]  # ends in "sop" (any id works for this check)
    strategy = Recording(1)
    ((output,),) = generate(model, [context], strategy, max_gen_length=6, mask_positions=[mask_position])
    generated = output[len(context) :]
    n = len(output) - 1  # the last token was never fed back
    full = build_inputs([context], n - len(context) + 1, [mask_position])
    tokens = torch.tensor([output[:n]])
    with torch.no_grad():
        logits = model(tokens, full.position_ids[:, :n], full.attention_mask[:, :, :n, :n])
    expected = logits[0, len(context) - 1 :]  # the logits that predicted each generated token
    assert_model_close(torch.cat([s[0] for s in strategy.logits]), expected, model.config)
    assert expected.argmax(-1).tolist() == generated


def test_batch_gives_each_sample_its_own_result(tiny_model):
    model, _ = tiny_model
    contexts = [[7, 8, 9, 600], [11, 12, 13, 14, 15, 16, 17, 600], [3, 600]]
    mask_positions = [None, 4, 0]
    batched = generate(model, contexts, BaseStrategy(3, top_k=1), 5, mask_positions)
    for context, position, result in zip(contexts, mask_positions, batched, strict=True):
        alone = generate(model, [context], BaseStrategy(1, top_k=1), 5, [position])
        assert result == alone[0]


def generate_without_cache(model, context, strategy, max_gen_length):
    """Reference decoder: every step recomputes the full forward of every beam, no KV cache."""
    tokens = torch.tensor([[context]])  # [1, 1, L]
    for _ in range(max_gen_length):
        beams, length = tokens.shape[1], tokens.shape[2]
        inputs = build_inputs([context], length - len(context) + 1, [None])
        rows = tokens[0].clamp(min=0)
        with torch.no_grad():
            logits = model(
                rows,
                inputs.position_ids[:, :length].expand(beams, -1),
                inputs.attention_mask[:, :, :length, :length],
            )[:, -1]
        tokens, _ = strategy.forward(logits[None], tokens)
        if strategy.is_done:
            break
    return strategy.finalize(tokens)[0]


def test_beam_search_reorders_the_cache_correctly(tiny_model):
    model, _ = tiny_model
    context = [20, 30, 40, 50, 600]

    def strategy():
        return BeamSearchStrategy(1, 3, end_tokens=[601], deterministic=True, no_repeat_ngram_size=2)

    (cached,) = generate(model, [context], strategy(), 6)
    assert cached == generate_without_cache(model, context, strategy(), 6)
    assert len(cached) == 3 and len({tuple(b) for b in cached}) == 3


def test_prepare_query_follows_the_original(tiny_model):
    # GLM-130B's icetk flavour: every segment encoded on its own, exactly as the original generate.py.
    tok = GLMTokenizer.icetk(tiny_model[1].model_file)
    mask, gmask, smask, eos = (tok.get_command(n) for n in ("[MASK]", "[gMASK]", "[sMASK]", "eos"))
    query = prepare_query("The river [MASK] the town.", tok)
    assert query.ids == [*tok.tokenize("The river "), mask, *tok.tokenize(" the town."), eos]
    assert query.mask_id == mask and not query.use_gmask
    query = prepare_query("The river runs", tok)  # no mask: [gMASK] appended, no eos
    assert query.ids == [*tok.tokenize("The river runs"), gmask]
    assert query.use_gmask
    query = prepare_query("A [sMASK] B [MASK]", tok)  # [MASK] wins; a text ending in a mask gets no eos
    assert query.mask_id == mask
    assert query.ids == [*tok.tokenize("A "), smask, *tok.tokenize(" B "), mask]
    assert prepare_query("Rain [sMASK]", tok).mask_id == smask


@pytest.mark.parametrize(
    "left,blank,right",
    [
        ("The river", " runs", " through the old town."),
        ("清华大学是", "北京", "的一所大学。"),
        ("Rain fell", " all", ""),
    ],
)
def test_own_tokenizer_encodes_a_query_as_inside_the_whole_text(tiny_model, left, blank, right):
    # The project's models were trained on blanks cut out of whole-text tokenizations.
    _, tok = tiny_model
    whole = tok.tokenize(left + blank + right)
    ids = prepare_query(f"{left} [MASK]{right}" if blank.startswith(" ") else f"{left}[MASK]{right}", tok).ids
    position = ids.index(tok.get_command("[MASK]"))
    before, after = ids[:position], ids[position + 1 :]
    if right:  # eos follows a text that does not end in a mask
        assert after.pop() == tok.eos_id
    assert whole[: len(before)] == before
    assert whole[len(whole) - len(after) :] == after


def test_fill_blanks_fills_masks_left_to_right(tiny_model):
    model, tok = tiny_model
    options = GenerationOptions(top_k=1, top_p=0.0, out_seq_length=40)
    text = "春天来了，[MASK]开了。The river [MASK] the town."
    ((answer,),) = fill_blanks(model, tok, [text], options)
    mask = tok.get_command("[MASK]")
    assert mask not in answer.ids and len(answer.spans) == 2
    # The first blank is what greedy decoding gives for the first mask alone.
    query = prepare_query(text, tok)
    position = query.ids.index(mask)
    context = [*query.ids, tok.sop_id]
    greedy = BaseStrategy(1, top_k=1, end_tokens=tok.end_ids)
    ((out,),) = generate(model, [context], greedy, 40 - len(context), [position])
    first = out[len(context) :]
    if first and first[-1] in tok.end_ids:
        first = first[:-1]
    start, end = answer.spans[0]
    assert answer.ids[start:end] == first
    assert answer.ids[:start] == query.ids[:position]


def test_fill_blanks_batch_equals_one_by_one(tiny_model):
    model, tok = tiny_model
    options = GenerationOptions(top_k=1, top_p=0.0, out_seq_length=48)
    texts = ["The quick brown fox", "北京是[MASK]的首都。", "A [MASK] model fills [MASK] blanks."]
    batched = fill_blanks(model, tok, texts, options)
    for text, answers in zip(texts, batched, strict=True):
        assert [a.ids for a in answers] == [a.ids for a in fill_blanks(model, tok, [text], options)[0]]


def test_prompts_without_room_are_refused(tiny_model):
    model, tok = tiny_model
    long_text = "word " * 60
    with pytest.raises(ValueError, match="no room"):
        fill_blanks(model, tok, [long_text], GenerationOptions(out_seq_length=20))
    with pytest.raises(ValueError, match="maximum sequence length"):
        fill_blanks(model, tok, ["hi"], GenerationOptions(out_seq_length=100_000))


def test_blanks_never_hold_mask_or_padding_ids(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(0)
    options = GenerationOptions(temperature=5.0, top_p=0.0, out_seq_length=200)  # near-uniform sampling
    answers = fill_blanks(model, tok, ["[MASK]"] * 4, options)
    generated = [t for (answer,) in answers for t in answer.ids]
    assert len(generated) > 300
    assert all(t < tok.vocab_size and t not in tok.mask_ids.values() for t in generated)


def test_batch_gives_each_sample_its_own_beams(tiny_model):
    # Contexts of different lengths: the shorter ones are padded in the batch. With a length penalty and
    # n-gram bans, counting the padding (as before) changes which beams win.
    model, _ = tiny_model
    contexts = [[7, 8, 9, 600], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 600], [3, 600]]
    mask_positions = [None, 4, 0]

    def strategy(batch):
        return BeamSearchStrategy(
            batch, 3, length_penalty=2.0, consider_end=True, end_tokens=[5, 6], deterministic=True,
            no_repeat_ngram_size=2,
        )  # fmt: skip

    batched = generate(model, contexts, strategy(3), 8, mask_positions)
    for context, position, beams in zip(contexts, mask_positions, batched, strict=True):
        assert beams == generate(model, [context], strategy(1), 8, [position])[0]


def test_beam_search_batch_equals_alone_on_the_bundled_model(bundled):
    # The review's case: with length_penalty=1, "Rain [MASK]." batched with a longer query gave other
    # beams than alone.
    model, tok = bundled
    options = GenerationOptions(
        "BeamSearchStrategy", out_seq_length=40, num_beams=4, deterministic=True, length_penalty=1.0
    )
    texts = ["Rain [MASK].", "The President said that the [MASK] of the United States is strong."]
    batched = fill_blanks(model, tok, texts, options)
    for text, answers in zip(texts, batched, strict=True):
        assert [a.ids for a in answers] == [a.ids for a in fill_blanks(model, tok, [text], options)[0]]


def test_seeded_sampling_batch_equals_alone(tiny_model):
    # seeds[i] seeds text i's own generator: its answer does not depend on its neighbours in the batch.
    model, tok = tiny_model
    options = GenerationOptions(temperature=1.0, top_p=0.0, out_seq_length=40)
    texts = ["The quick brown fox", "北京是[MASK]的首都。", "A [MASK] model fills [MASK] blanks."]
    seeds = [11, 12, 13]
    batched = fill_blanks(model, tok, texts, options, seeds=seeds)
    for text, seed, answers in zip(texts, seeds, batched, strict=True):
        assert answers[0].ids == fill_blanks(model, tok, [text], options, seeds=[seed])[0][0].ids
    # The seeds matter: another seed samples another answer.
    assert fill_blanks(model, tok, texts[:1], options, seeds=[99])[0][0].ids != batched[0][0].ids


def test_seeded_stochastic_beam_search_batch_equals_alone(tiny_model):
    model, tok = tiny_model
    options = GenerationOptions("BeamSearchStrategy", num_beams=2, out_seq_length=30)
    texts = ["Good tests [MASK].", "The river runs through [MASK] town and [MASK]."]
    batched = fill_blanks(model, tok, texts, options, seeds=[5, 6])
    for text, seed, answers in zip(texts, [5, 6], batched, strict=True):
        alone = fill_blanks(model, tok, [text], options, seeds=[seed])[0]
        assert [a.ids for a in answers] == [a.ids for a in alone]


def reference_infill(model, tok, text: str, max_length: int) -> str:
    """An independent greedy infiller: the original generate.py's loop written out, with no KV cache (every
    step recomputes the whole sequence), the original's mask formula and hand-built position ids."""
    masks = [m for m in ("[MASK]", "[sMASK]", "[gMASK]") if m in text]
    mask = masks[0] if masks else "[gMASK]"
    mask_id = tok.get_command(mask)
    ids = tok.tokenize_with_masks(text, mask_appended=not masks)
    if not masks:
        ids.append(mask_id)
    elif not text.endswith("]"):
        ids.append(tok.eos_id)
    while mask_id in ids:
        pos = ids.index(mask_id)
        context = [*ids, tok.sop_id]
        n = len(context)
        generated = []
        while n + len(generated) < max_length:
            seq = context + generated
            positions = (
                list(range(len(seq))) if mask == "[gMASK]" else [*range(n - 1), *[pos] * (len(seq) - n + 1)]
            )
            with torch.no_grad():
                logits = model(torch.tensor([seq]), torch.tensor([positions]), original_mask(n, len(seq)))[
                    0, -1
                ]
            logits[tok.vocab_size :] = float("-inf")  # embedding padding rows
            logits[list(tok.mask_ids.values())] = float("-inf")
            token = int(logits.argmax())
            if token in (tok.eop_id, tok.eos_id):
                break
            generated.append(token)
        ids = ids[:pos] + generated + ids[pos + 1 :]
    if ids[-1] == tok.eos_id:
        ids.pop()
    return tok.detokenize(ids)


# Greedy infills of the bundled model at out_seq_length 32, read and checked by hand: each keeps the query
# around its blanks and fills every [MASK] with a short span ending where the text resumes.
GREEDY_INFILLS = {
    "Rain [MASK].": "Rain to.",
    "Tsinghua University is located in [MASK].": "Tsinghua University is located in the document.",
    "春眠不觉晓，[MASK]。": "春眠不觉晓，月。",
    "The river [MASK] the town, and the [MASK] was cold.": "The river was the town, and the whole was cold.",
    "Music and": "Music and unable, and the whale-ddding of the whale-wat, the whale-water, and the",
}


def test_greedy_infills_equal_an_independent_decoder(bundled):
    model, tok = bundled
    texts = list(GREEDY_INFILLS)
    options = GenerationOptions(top_k=1, top_p=0.0, out_seq_length=32)
    answers = fill_blanks(model, tok, texts, options)
    assert {t: a.text(tok) for t, (a,) in zip(texts, answers, strict=True)} == GREEDY_INFILLS
    assert {t: reference_infill(model, tok, t, 32) for t in texts} == GREEDY_INFILLS


def test_beams_are_ranked_by_their_own_length_penalty(tiny_model):
    # Score each returned beam independently (full forward, log-softmax over the allowed tokens) and check
    # the order is the GNMT-penalised one, with the length counting the sample's own context, not padding.
    model, _ = tiny_model
    contexts = [[7, 8, 9, 600], [11, 12, 13, 14, 15, 16, 17, 18, 19, 600]]
    penalty = 1.5
    strategy = BeamSearchStrategy(
        2, 3, length_penalty=penalty, consider_end=True, end_tokens=[5, 6], deterministic=True
    )
    for context, beams in zip(contexts, generate(model, contexts, strategy, 6), strict=True):
        penalised = []
        for beam in beams:
            n, t = len(context), len(beam)
            inputs = build_inputs([context], t - n, [None])
            with torch.no_grad():
                logits = model(
                    torch.tensor([beam]), inputs.position_ids[:, :t], inputs.attention_mask[:, :, :t, :t]
                )[0]
            logp = logits[n - 1 : t - 1].float().log_softmax(-1)
            score = sum(logp[i, beam[n + i]].item() for i in range(t - n))
            penalised.append(score / ((5 + t) / 6) ** penalty)
        assert penalised == sorted(penalised, reverse=True)


def test_stats_count_the_generated_tokens(tiny_model):
    model, tok = tiny_model
    stats = GenerationStats()
    options = GenerationOptions(top_k=1, top_p=0.0, out_seq_length=40)
    (answer,), (other,) = fill_blanks(
        model, tok, ["A [MASK] model fills [MASK] blanks.", "Rain"], options, stats=stats
    )
    assert stats.new_tokens == sum(e - s for s, e in answer.spans) + sum(e - s for s, e in other.spans)
    assert 0 < stats.first_token_seconds <= stats.seconds


def test_max_new_tokens_bounds_each_blank(tiny_model):
    model, tok = tiny_model
    options = GenerationOptions(temperature=5.0, top_p=0.0, out_seq_length=60, max_new_tokens=3)
    torch.manual_seed(0)
    ((answer,),) = fill_blanks(model, tok, ["A [MASK] model fills [MASK] blanks."], options)
    assert [e - s for s, e in answer.spans] == [3, 3]  # near-uniform sampling rarely ends within 3 tokens


def test_only_exact_mask_tokens_are_masks(tiny_model):
    # The original tested the substring "MASK]", so "[XMASK]" counted as a mask and nothing was generated.
    _, tok = tiny_model
    gmask = tok.get_command("[gMASK]")
    query = prepare_query("Hello [XMASK] world", tok)
    assert query.use_gmask and query.ids == [*tok.tokenize_with_masks("Hello [XMASK] world", True), gmask]
    query = prepare_query("Hello [XMASK]", tok)  # no real mask at the end: [gMASK] appended, no eos
    assert query.ids[-1] == gmask and tok.eos_id not in query.ids
    query = prepare_query("Hello [MASK] and [XMASK]", tok)  # ends in text: eos appended
    assert query.ids[-1] == tok.eos_id and not query.use_gmask


def test_unfilled_masks_are_shown_as_typed(tiny_model):
    model, tok = tiny_model
    options = GenerationOptions(top_k=1, top_p=0.0, out_seq_length=40)
    ((answer,),) = fill_blanks(model, tok, ["Start [sMASK] then [MASK] and [gMASK] end."], options)
    text = answer.text(tok)
    (blank,) = answer.blanks(tok)
    assert text.startswith("Start [sMASK] then") and text.endswith("and [gMASK] end.")
    assert blank.strip() in text and "[[" not in text


def test_streamed_pieces_add_up_to_the_answer(tiny_model):
    model, tok = tiny_model
    pieces = []
    options = GenerationOptions(temperature=0.8, top_p=0.0, out_seq_length=60)
    text = "The river [MASK] the [sMASK] town, and the [MASK] was cold."
    ((answer,),) = fill_blanks(model, tok, [text], options, lambda t, b: pieces.append((t, b)), seeds=[3])
    assert "".join(t for t, _ in pieces) == answer.text(tok)
    streamed_blanks = "".join(t for t, blank in pieces if blank)
    assert streamed_blanks == "".join(t for t, blank in answer.segments(tok) if blank)
    assert len(answer.spans) == 2 and len(pieces) > 4  # the text grew step by step, blanks and all
