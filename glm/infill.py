"""Blank infilling of text, as GLM-130B's generate.py does it, over a batch of queries.

Mask priority is `[MASK]` > `[sMASK]` > `[gMASK]`: only masks of the chosen kind are filled, left to right,
one generation per mask, each conditioned on the best beam of the previous ones. `[gMASK]` is appended to a
text without masks, and `eos` unless the text ends in a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glm.decoding import generate
from glm.model import GLM
from glm.strategies import BaseStrategy, BeamSearchStrategy
from glm.tokenizer import GLMTokenizer


@dataclass
class GenerationOptions:
    """The generation flags of the original generate.py, with its defaults (scripts/generate.sh's)."""

    sampling_strategy: str = "BaseStrategy"
    out_seq_length: int = 256  # counts the context, as in the original
    min_gen_length: int = 0
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.7
    deterministic: bool = False  # beam search: top candidates instead of sampled ones

    def __post_init__(self) -> None:
        if self.sampling_strategy not in ("BaseStrategy", "BeamSearchStrategy"):
            raise ValueError(
                f"unknown sampling strategy '{self.sampling_strategy}'; "
                "use BaseStrategy or BeamSearchStrategy"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.num_beams < 1 or self.out_seq_length < 2:
            raise ValueError("num_beams must be >= 1 and out_seq_length >= 2")


def make_strategy(
    options: GenerationOptions, batch_size: int, end_tokens: list[int], invalid_slices: list[slice] = ()
):
    if options.sampling_strategy == "BeamSearchStrategy":
        return BeamSearchStrategy(
            batch_size,
            options.num_beams,
            length_penalty=options.length_penalty,
            consider_end=True,
            end_tokens=end_tokens,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
            min_gen_length=options.min_gen_length,
            deterministic=options.deterministic,
            invalid_slices=invalid_slices,
        )
    return BaseStrategy(
        batch_size,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        end_tokens=end_tokens,
        invalid_slices=invalid_slices,
    )


@dataclass
class Query:
    """A text prepared for infilling: its ids and which mask kind gets filled."""

    ids: list[int]
    mask_id: int
    use_gmask: bool


def prepare_query(text: str, tokenizer: GLMTokenizer) -> Query:
    if "[MASK]" in text:
        mask = "[MASK]"
    elif "[sMASK]" in text:
        mask = "[sMASK]"
    else:
        mask = "[gMASK]"
    ids = tokenizer.tokenize_with_masks(text, mask_appended="MASK]" not in text)
    if "MASK]" not in text:
        ids.append(tokenizer.get_command("[gMASK]"))
        text += " [gMASK]"
    if not text.endswith("MASK]"):
        ids.append(tokenizer.eos_id)
    return Query(ids, tokenizer.get_command(mask), use_gmask=mask == "[gMASK]")


@dataclass
class Answer:
    """One output beam: its token ids with the blanks filled, and the [start, end) span of each blank."""

    ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)

    def fill(self, position: int, blank: list[int]) -> Answer:
        """This answer with the mask at `position` replaced by `blank`."""
        shift = len(blank) - 1
        spans = [(s + shift, e + shift) if s > position else (s, e) for s, e in self.spans]
        ids = self.ids[:position] + blank + self.ids[position + 1 :]
        return Answer(ids, sorted([*spans, (position, position + len(blank))]))

    def text(self, tokenizer: GLMTokenizer) -> str:
        return tokenizer.detokenize(self.ids)

    def blanks(self, tokenizer: GLMTokenizer) -> list[str]:
        return [tokenizer.detokenize(self.ids[s:e]) for s, e in self.spans]


def fill_blanks(
    model: GLM,
    tokenizer: GLMTokenizer,
    texts: list[str],
    options: GenerationOptions | None = None,
    on_text: Callable[[str], None] | None = None,
) -> list[list[Answer]]:
    """Fill every blank of each text; returns per text its answers (one, or one per beam, best first).

    `on_text` receives the generated text of the first query as it grows (sampling only), for streaming.
    Raises ValueError for a text that leaves no room to generate under out_seq_length or exceeds the
    model's maximum length.
    """
    options = options or GenerationOptions()
    if options.out_seq_length > model.config.max_sequence_length:
        raise ValueError(
            f"out_seq_length {options.out_seq_length} exceeds the model's maximum sequence length "
            f"{model.config.max_sequence_length}"
        )
    queries = [prepare_query(t, tokenizer) for t in texts]
    sop, end_tokens = tokenizer.sop_id, [tokenizer.eop_id, tokenizer.eos_id]
    # Unlike the original, never generate a mask token (it would be filled next, without end) nor one of
    # the embedding's padding rows past the tokenizer's vocabulary.
    masks = sorted(tokenizer.mask_ids.values())
    invalid = [slice(masks[0], masks[-1] + 1), slice(tokenizer.vocab_size, None)]
    for text, query in zip(texts, queries, strict=True):
        if len(query.ids) + 1 >= options.out_seq_length:
            raise ValueError(
                f"the prompt is {len(query.ids) + 1} tokens with sop, which leaves no room to generate under "
                f"out_seq_length {options.out_seq_length}: shorten it or raise --out-seq-length "
                f"(prompt: {text[:40]!r})"
            )

    # answers[i]: query i's beams so far; later blanks are conditioned on beam 0 only, as in the original.
    answers = [[Answer(q.ids)] for q in queries]
    while True:
        active = [i for i, q in enumerate(queries) if q.mask_id in answers[i][0].ids]
        if not active:
            break
        contexts = [[*answers[i][0].ids, sop] for i in active]
        positions = [answers[i][0].ids.index(queries[i].mask_id) for i in active]
        budgets = [options.out_seq_length - len(c) for c in contexts]  # out_seq_length counts the context
        if min(budgets) < 1:
            raise ValueError(
                f"after filling earlier blanks the context is {max(len(c) for c in contexts)} tokens, which "
                f"leaves no room under out_seq_length {options.out_seq_length}; raise --out-seq-length"
            )
        mask_positions = [None if queries[i].use_gmask else p for i, p in zip(active, positions, strict=True)]
        strategy = make_strategy(options, len(active), end_tokens, invalid)
        stream = on_text is not None and active[0] == 0 and options.sampling_strategy == "BaseStrategy"
        on_step = _streamer(tokenizer, end_tokens, on_text) if stream else None
        outputs = generate(model, contexts, strategy, max(budgets), mask_positions, on_step)
        per_sample = zip(active, contexts, positions, budgets, outputs, strict=True)
        for i, context, position, budget, outs in per_sample:
            best = answers[i][0]
            answers[i] = []
            for out in outs or [context]:  # a search that kept no beam fills the blank with nothing
                blank = out[len(context) : len(context) + budget]  # each sample's own budget
                if blank and blank[-1] in end_tokens:
                    blank = blank[:-1]
                answers[i].append(best.fill(position, blank))
    for query_answers in answers:
        for answer in query_answers:
            if answer.ids and answer.ids[-1] == tokenizer.eos_id:
                answer.ids.pop()
    return answers


def _streamer(tokenizer: GLMTokenizer, end_tokens: list[int], on_text: Callable[[str], None]):
    """An on_step callback that passes on the new text of the first sample's first beam."""
    shown = ""

    def on_step(generated) -> None:
        nonlocal shown
        ids = [t for t in generated[0, 0].tolist() if t >= 0 and t not in end_tokens]
        text = tokenizer.detokenize(ids).rstrip("\ufffd")  # hold back a character whose bytes are incomplete
        if text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown) :])
            shown = text

    return on_step
