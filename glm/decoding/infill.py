"""Blank infilling of text, as GLM-130B's generate.py does it, over a batch of queries.

Mask priority is `[MASK]` > `[sMASK]` > `[gMASK]`: only masks of the chosen kind are filled, left to right,
one generation per mask, each conditioned on the best beam of the previous ones. `[gMASK]` is appended to a
text without masks, and `eos` unless the text ends in a mask. Masks are the exact tokens `[MASK]`,
`[sMASK]` and `[gMASK]` (the original tested the substring `MASK]`, so `[XMASK]` counted as a mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from glm.decoding.engine import Engine
from glm.decoding.factory import banned_tokens, make_strategy
from glm.decoding.options import GenerationOptions
from glm.decoding.requests import Output, Request
from glm.model import GLM
from glm.tokenizer import MASK_PATTERN, GLMTokenizer

__all__ = [
    "Answer",
    "GenerationStats",
    "MaskText",
    "Query",
    "fill_blanks",
    "prepare_query",
]


@dataclass(frozen=True)
class MaskText:
    """A mask that is not filled (not of the chosen kind), shown as typed: the token and the whitespace the
    user put around it (the tokenizer gives the space before a mask to the blank, so ids lose it)."""

    token: str
    before: str
    after: str


@dataclass
class Query:
    """A text prepared for infilling: its ids, which mask kind gets filled, and the masks that do not."""

    ids: list[int]
    mask_id: int
    use_gmask: bool
    unfilled: tuple[MaskText, ...] = ()
    text: str = ""  # as typed


def prepare_query(text: str, tokenizer: GLMTokenizer) -> Query:
    """`text` as ids ready for infilling (`[gMASK]` or `eos` appended), with the mask kind it fills."""
    pieces = MASK_PATTERN.split(text)  # text, mask, text, ..., text
    masks = pieces[1::2]
    mask = next((m for m in ("[MASK]", "[sMASK]") if m in masks), "[gMASK]")
    ids = tokenizer.tokenize_with_masks(text, mask_appended=not masks)
    if not masks:
        ids.append(tokenizer.get_command("[gMASK]"))
    elif pieces[-1]:  # the text does not end in a mask
        ids.append(tokenizer.eos_id)
    unfilled = tuple(
        MaskText(
            m, pieces[2 * k][len(pieces[2 * k].rstrip()) :], pieces[2 * k + 2][: _lead(pieces[2 * k + 2])]
        )
        for k, m in enumerate(masks)
        if m != mask
    )
    return Query(ids, tokenizer.get_command(mask), mask == "[gMASK]", unfilled, text)


def _lead(text: str) -> int:
    """Length of the leading whitespace of text."""
    return len(text) - len(text.lstrip())


@dataclass
class Answer:
    """One output beam: its token ids with the blanks filled, the [start, end) span of each blank, and the
    query's unfilled masks (for display)."""

    ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    unfilled: tuple[MaskText, ...] = ()

    def fill(self, position: int, blank: list[int]) -> Answer:
        """This answer with the mask at `position` replaced by `blank`."""
        shift = len(blank) - 1
        spans = [(s + shift, e + shift) if s > position else (s, e) for s, e in self.spans]
        ids = self.ids[:position] + blank + self.ids[position + 1 :]
        return Answer(ids, sorted([*spans, (position, position + len(blank))]), self.unfilled)

    def segments(self, tokenizer: GLMTokenizer) -> list[tuple[str, bool]]:
        """The answer's text as (piece, is_blank) pairs; their concatenation is `text()`.

        The text is decoded whole (so it is what the tokens say, spaces included), unfilled masks are shown
        as typed, and a blank's leading whitespace is given to the text before it.
        """
        names = {i: name for name, i in tokenizer.mask_ids.items()}
        cuts = [i for i, t in enumerate(self.ids) if t in names]  # masks left in the ids
        runs = [(a + 1 if a >= 0 else 0, b) for a, b in zip([-1, *cuts], [*cuts, len(self.ids)], strict=True)]
        out: list[tuple[str, bool]] = []
        for k, (a, b) in enumerate(runs):
            pieces = self._run_segments(tokenizer, a, b)
            if k > 0:  # the mask before this run
                mask = self.unfilled[k - 1] if k - 1 < len(self.unfilled) else None
                token = mask.token if mask else names[self.ids[cuts[k - 1]]]
                text = "".join(t for t, _ in out)
                following = "".join(t for t, _ in pieces)
                before = mask.before if mask and not text.endswith(mask.before) else ""
                after = mask.after if mask and not following.startswith(mask.after) else ""
                out.append((before + token + after, False))
            out += pieces
        return [(t, blank) for t, blank in out if t]

    def _run_segments(self, tokenizer: GLMTokenizer, a: int, b: int) -> list[tuple[str, bool]]:
        """Segments of ids[a:b] (no masks inside), with blank boundaries at decoded prefix lengths."""
        whole = tokenizer.detokenize(self.ids[a:b])
        out, last = [], 0
        for s, e in self.spans:
            if not (a <= s and e <= b):
                continue
            start = min(max(len(tokenizer.detokenize(self.ids[a:s])), last), len(whole))
            end = min(max(len(tokenizer.detokenize(self.ids[a:e])), start), len(whole))
            blank = whole[start:end]
            start += _lead(blank)  # the space before a blank is text, not blank
            out += [(whole[last:start], False), (whole[start:end], True)]
            last = end
        out.append((whole[last:], False))
        return out

    def text(self, tokenizer: GLMTokenizer) -> str:
        return "".join(t for t, _ in self.segments(tokenizer))

    def blanks(self, tokenizer: GLMTokenizer) -> list[str]:
        return [tokenizer.detokenize(self.ids[s:e]) for s, e in self.spans]


@dataclass
class GenerationStats:
    """What one fill_blanks call did: tokens generated into the best answers, time to the first generated
    token (after the prefill of the first blank), and the whole time."""

    new_tokens: int = 0
    first_token_seconds: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def fill_blanks(
    model: GLM,
    tokenizer: GLMTokenizer,
    texts: Sequence[str | Query],
    options: GenerationOptions | None = None,
    on_text: Callable[[str, bool], None] | None = None,
    seeds: Sequence[int] | None = None,
    stats: GenerationStats | None = None,
) -> list[list[Answer]]:
    """Fill every blank of each text (or query prepared by `prepare_query`); returns per text its answers
    (one, or one per beam, best first).

    `on_text(piece, is_blank)` receives the first text's answer as it is generated (sampling only): the
    pieces add up to `answers[0][0].text(tokenizer)`. `seeds[i]`, if given, seeds text i's own random
    generator, so its answer does not depend on the other texts of the batch (without seeds, the batch
    shares the global torch RNG). `stats`, if given, is filled in.
    Raises ValueError for a text that leaves no room to generate under out_seq_length or exceeds the
    model's maximum length.
    """
    started = time.perf_counter()
    options = options or GenerationOptions()
    if options.out_seq_length > model.config.max_sequence_length:
        raise ValueError(
            f"out_seq_length {options.out_seq_length} exceeds the model's maximum sequence length "
            f"{model.config.max_sequence_length}"
        )
    if seeds is not None and len(seeds) != len(texts):
        raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts")
    queries = [t if isinstance(t, Query) else prepare_query(t, tokenizer) for t in texts]
    sop, end_tokens = tokenizer.sop_id, [tokenizer.eop_id, tokenizer.eos_id]
    invalid = banned_tokens(tokenizer)
    for query in queries:
        if len(query.ids) + 1 >= options.out_seq_length:
            raise ValueError(
                f"the prompt is {len(query.ids) + 1} tokens with sop, which leaves no room to generate under "
                f"out_seq_length {options.out_seq_length}: shorten it or raise --out-seq-length "
                f"(prompt: {query.text[:40]!r})"
            )
    stats = stats if stats is not None else GenerationStats()
    streamer = (
        _Streamer(tokenizer, on_text) if on_text and options.sampling_strategy == "BaseStrategy" else None
    )

    # answers[i]: query i's beams so far; later blanks are conditioned on beam 0 only, as in the original.
    # Each blank is one engine request with its own budget and generator, so a text's answer is what it
    # would be alone; a text's next blank joins the running batch as soon as its previous one is done.
    answers = [[Answer(q.ids, unfilled=q.unfilled)] for q in queries]
    width = options.num_beams if options.sampling_strategy == "BeamSearchStrategy" else 1
    engine = Engine(model, groups=len(texts), width=width, max_length=options.out_seq_length)
    finished: list[Request] = []

    def next_blank(i: int) -> Request | None:
        best = answers[i][0]
        if queries[i].mask_id not in best.ids:
            return None
        context = [*best.ids, sop]
        position = best.ids.index(queries[i].mask_id)
        # out_seq_length counts the context, as in the original; max_new_tokens counts the blank alone.
        budget = min(options.out_seq_length - len(context), options.max_new_tokens or options.out_seq_length)
        if budget < 1:
            raise ValueError(
                f"after filling earlier blanks the context is {len(context)} tokens, which leaves no room "
                f"under out_seq_length {options.out_seq_length}; raise --out-seq-length"
            )
        generator = None
        if seeds is not None:  # a generator per sample and blank
            generator = torch.Generator(model.device).manual_seed(_blank_seed(seeds[i], len(best.spans)))
        shown = streamer if streamer is not None and i == 0 else None
        return Request(
            context,
            make_strategy(options, 1, end_tokens, invalid, generator),
            budget,
            mask_position=None if queries[i].use_gmask else position,
            on_step=_step_watcher(stats, started, best, position, end_tokens, shown),
            on_finish=finished.append,
            tag=(i, position),
        )

    for i in range(len(queries)):
        request = next_blank(i)
        if request is not None:
            engine.submit(request)
    while engine.busy:
        engine.step()
        while finished:
            request = finished.pop(0)
            if request.error is not None:
                raise request.error
            i, position = request.tag
            best = answers[i][0]
            # a search that kept no beam fills the blank with nothing
            answers[i] = [best.fill(position, out.ids) for out in request.outputs or [Output([], "stop")]]
            stats.new_tokens += len(request.outputs[0].ids) if request.outputs else 0  # the best answer's
            following = next_blank(i)
            if following is not None:
                engine.submit(following)
    for query_answers in answers:
        for answer in query_answers:
            if answer.ids and answer.ids[-1] == tokenizer.eos_id:
                answer.ids.pop()
    if streamer is not None:
        streamer.show(answers[0][0], len(answers[0][0].ids), final=True)
    stats.seconds = time.perf_counter() - started
    return answers


def _blank_seed(seed: int, blank: int) -> int:
    """The seed of a sample's blank-th blank (a 64-bit mix, so nearby seeds give unrelated streams)."""
    return (seed * 0x9E3779B97F4A7C15 + blank * 0xBF58476D1CE4E5B9 + blank) % 2**64


def _generated(row: list[int], end_tokens: list[int]) -> list[int]:
    """The tokens of one generated row before its first pad (-1) or end token."""
    out = []
    for t in row:
        if t < 0 or t in end_tokens:
            break
        out.append(t)
    return out


def _step_watcher(
    stats: GenerationStats,
    started: float,
    best: Answer,
    position: int,
    end_tokens: list[int],
    streamer: _Streamer | None,
) -> Callable[[Request], None]:
    """An on_step callback that records the time to the first token and streams the first sample."""

    def on_step(request: Request) -> None:
        if stats.first_token_seconds is None:
            stats.first_token_seconds = time.perf_counter() - started
        if streamer is not None:
            blank = _generated(request.generated(0), end_tokens)
            streamer.show(best.fill(position, blank), position + len(blank))

    return on_step


class _Streamer:
    """Passes on the text of a growing answer, up to the end of the blank being generated, as
    (piece, is_blank) pairs that add up to the final answer's text."""

    def __init__(self, tokenizer: GLMTokenizer, on_text: Callable[[str, bool], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.shown = ""

    def show(self, answer: Answer, upto: int, final: bool = False) -> None:
        partial = Answer(answer.ids[:upto], [s for s in answer.spans if s[1] <= upto], answer.unfilled)
        segments = partial.segments(self.tokenizer)
        text = "".join(t for t, _ in segments)
        if not final:
            text = text.rstrip("\ufffd")  # hold back a character whose bytes are incomplete
        if not text.startswith(self.shown) or len(text) == len(self.shown):
            return
        offset = 0
        for piece, is_blank in segments:
            start, end = max(offset, len(self.shown)), min(offset + len(piece), len(text))
            if start < end:
                self.on_text(text[start:end], is_blank)
            offset += len(piece)
        self.shown = text
