"""Decoding strategies: sampling (`BaseStrategy`) and beam search (`BeamSearchStrategy`).

A plain-PyTorch port of GLM-130B's `generation/strategies.py` (with SwissArmyTransformer's `top_k_logits`),
with the original's bugs fixed: top-p works per row for any batch size, `no_repeat_ngram_size=1` bans every
token already generated, and beam search survives steps that yield fewer than `num_beams` continuations.

The decoding loop calls `forward(logits [B, nb, V], tokens [B, nb, L], context_lengths)` once per generated
token, reorders its KV cache with the returned source beam indices, stops when `is_done`, then calls
`finalize(tokens)`. In a batch, rows are left-padded to a common length: `context_lengths[b]` says how many
tokens before the generated ones are element b's own context, so beam search counts neither the padding in
its length penalty nor padding tokens in its n-grams, and each element gets what it would get alone.

`generator` is a torch.Generator or one per batch element: with one per element, an element's samples do
not depend on its neighbours in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from glm.cpu_matmul import unique_argmax

FILTER_VALUE = -65504.0  # the original's value for removed logits (the fp16 minimum)
NEG_INF = float("-inf")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Top-k, then top-p (nucleus) filtering along the last dim; removed logits become -65504.

    top-k keeps every logit >= the k-th largest (ties kept). top-p keeps, per row, the most probable tokens up
    to and including the first whose cumulative probability exceeds `top_p` (the top token is always kept).
    0 disables either filter. Returns a new tensor; the input is not modified.
    """
    logits = logits.clone()
    vocab = logits.shape[-1]
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, vocab), dim=-1).values[..., -1:]  # [..., 1]
        logits.masked_fill_(logits < kth, FILTER_VALUE)
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V]
        cumulative = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)  # [..., V]
        remove = cumulative > top_p  # [..., V], in sorted order
        # Shift right by one: the first token crossing the threshold stays, and so does the top token.
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), FILTER_VALUE)  # back to vocab order
    return logits


Generators = torch.Generator | Sequence[torch.Generator] | None


def _row_generators(generator: Generators, rows: int) -> list[torch.Generator | None] | None:
    """One generator per row, or None for a single shared stream (a generator or the global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    if len(generator) < rows:
        raise ValueError(f"{len(generator)} generators for {rows} batch elements")
    return list(generator[:rows])


def sample_without_replacement(scores: Tensor, k: int, generator: Generators = None) -> Tensor:
    """k distinct indices per row of `scores` [N, C], distributed as `multinomial(softmax(scores), k)` without
    replacement, returned as [N, k] (Gumbel-top-k trick).

    Unlike `torch.multinomial`, this needs no normalisation (scores may be unnormalised log-probs) and does
    not fail when a row has fewer than k candidates of non-zero probability: -inf scores simply come last.
    `generator` may be one generator per row.
    """
    exp = torch.empty_like(scores, dtype=torch.float32)  # [N, C]
    per_row = _row_generators(generator, scores.shape[0])
    if per_row is None:
        exp.exponential_(generator=generator)  # Exp(1) noise
    else:
        for row, row_generator in zip(exp, per_row, strict=True):
            row.exponential_(generator=row_generator)
    gumbel = -exp.clamp_min_(torch.finfo(torch.float32).tiny).log()  # [N, C], finite Gumbel(0, 1)
    return torch.topk(scores.float() + gumbel, k, dim=-1).indices  # [N, k]


def _cut(seq: list[int]) -> list[int]:
    """`seq` up to (excluding) its first -1 pad."""
    return seq[: seq.index(-1)] if -1 in seq else seq


class BaseStrategy:
    """Sampling with temperature, top-k and top-p; one beam per batch element.

    A batch element that samples an end token is done: the end token is kept and -1 is appended to it from
    then on. `generator` (one, or one per batch element) must live on the logits' device.
    """

    num_beams = 1

    def __init__(
        self,
        batch_size: int,
        invalid_slices: Sequence[slice] = (),
        temperature: float = 1.0,
        top_k: int = 200,
        top_p: float = 0.0,
        end_tokens: Sequence[int] = (),
        generator: Generators = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.batch_size = batch_size
        self.invalid_slices = tuple(invalid_slices)
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.end_tokens = tuple(end_tokens)
        self.generator = generator
        self._done = torch.zeros(batch_size, dtype=torch.bool)
        self._end_ids: tuple[tuple[int, ...], Tensor] | None = None  # end_tokens and that tensor

    @property
    def is_done(self) -> bool:
        return bool(self._done.all())

    def next_token_probs(self, logits: Tensor) -> Tensor:
        """The sampling distribution [N, V] (fp32) for logits [..., V]: temperature, invalid slices, top-k,
        top-p, softmax."""
        logits = logits.reshape(-1, logits.shape[-1]).float() / self.temperature  # [N, V], a fresh tensor
        for invalid in self.invalid_slices:
            logits[:, invalid] = FILTER_VALUE
        logits = filter_logits(logits, self.top_k, self.top_p)
        return logits.softmax(dim=-1)  # [N, V]

    def _unique_argmax(self, logits: Tensor) -> Tensor | None:
        """top_k = 1 keeps only the maximum, so the draw is the argmax [B]; None when some row's maximum is
        tied (the draw among the ties is then made as the original makes it)."""
        scores = logits.reshape(-1, logits.shape[-1])
        if scores.shape[-1] < 2:
            return None
        found = unique_argmax(scores, self.invalid_slices, FILTER_VALUE)  # one native pass, where it applies
        if found is not None:
            return found
        if self.invalid_slices:
            scores = scores.clone()
            for invalid in self.invalid_slices:
                scores[:, invalid] = FILTER_VALUE
        best, index = scores.max(dim=-1)  # one pass (topk(2) took ~10 x longer on a 16 k vocabulary)
        if bool(((scores == best[:, None]).sum(dim=-1) > 1).any()):
            return None
        return index

    def _draw(self, logits: Tensor) -> Tensor:
        """One token per row [B] drawn from the filtered distribution of logits [B, 1, V]."""
        batch = logits.shape[0]
        probs = self.next_token_probs(logits)  # [B, V]
        per_row = _row_generators(self.generator, batch)
        if per_row is None:
            return torch.multinomial(probs, 1, generator=self.generator).view(batch)
        pred = torch.full((batch,), -1, dtype=torch.long, device=probs.device)
        for b in (~self._done[:batch]).nonzero().flatten().tolist():  # a finished row draws nothing
            pred[b] = torch.multinomial(probs[b], 1, generator=per_row[b])[0]
        return pred

    def forward(
        self, logits: Tensor, tokens: Tensor, context_lengths: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Sample one token per row: logits [B, 1, V], tokens [B, 1, L] -> tokens [B, 1, L+1], None.

        `context_lengths` is accepted for the common interface; sampling does not depend on lengths.
        """
        batch, beams, _ = logits.shape
        if beams != 1 or batch > self.batch_size:
            raise ValueError(f"expected logits [<= {self.batch_size}, 1, V], got {tuple(logits.shape)}")
        pred = self._unique_argmax(logits) if self.top_k == 1 else None  # [B]
        if pred is None:
            pred = self._draw(logits)
        done = self._done.to(pred.device)  # [batch_size]
        pred = torch.where(done[:batch], -1, pred)  # finished rows get the -1 pad
        known = self._end_ids
        if known is None or known[0] != self.end_tokens or known[1].device != pred.device:
            ids = torch.tensor(self.end_tokens, dtype=pred.dtype, device=pred.device)
            known = self._end_ids = (self.end_tokens, ids)
        done[:batch] |= torch.isin(pred, known[1])  # [B]
        if batch < self.batch_size:
            done[batch:] = True  # rows the caller no longer passes count as done (as the original)
        self._done = done
        tokens = torch.cat((tokens, pred.view(batch, 1, 1).to(tokens.dtype)), dim=-1)  # [B, 1, L+1]
        return tokens, None

    def finalize(self, tokens: Tensor) -> list[list[list[int]]]:
        """Per batch element its single output, cut before the first -1; resets the done flags."""
        self._done = torch.zeros(self.batch_size, dtype=torch.bool)
        return [[_cut(beam) for beam in element] for element in tokens.tolist()]


class BeamSearchStrategy:
    """Beam search with a GNMT length penalty, stochastic by default (as the original).

    Scores are cumulative log-probs; a finished beam (one that produced an end token) of total length `len`
    (its own context included, padding not) is ranked by `score / ((5 + len) / 6) ** length_penalty`.

    Differences from the original, where it crashed or was ambiguous:
    - Masked (beam, token) pairs (invalid slices, end tokens before `min_gen_length`, banned n-grams) get a
      -inf score and are never chosen, even when too few valid candidates exist.
    - Candidates are drawn with the Gumbel-top-k trick (same distribution as the original's multinomial
      without replacement), so rows with fewer than k non-zero-probability candidates don't crash.
    - If a batch element gets fewer than `num_beams` continuations, the missing beams repeat its best kept
      beam (or, with none kept, its top candidate) with score -inf: they are "dead", never extended into a
      chosen candidate, and left out by `finalize`. An element whose live beams are all dead is done.
    - `no_repeat_ngram_size=1` bans every token generated so far in the beam (the original's key slicing
      broke for n=1), and bans apply as soon as a full (n-1)-token key exists.
    """

    def __init__(
        self,
        batch_size: int,
        num_beams: int,
        length_penalty: float = 1.0,
        consider_end: bool = False,
        end_tokens: Sequence[int] = (),
        invalid_slices: Sequence[slice] = (),
        no_repeat_ngram_size: int = 0,
        min_gen_length: int = 0,
        deterministic: bool = False,
        generator: Generators = None,
    ) -> None:
        self.batch_size = batch_size
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.consider_end = consider_end
        self.end_tokens = tuple(end_tokens)
        self.invalid_slices = tuple(invalid_slices)
        self.ngram = no_repeat_ngram_size
        self.min_gen_length = min_gen_length
        self.deterministic = deterministic
        self.generator = generator
        self._init_cache()

    def _init_cache(self) -> None:
        self.end_beams: list[list[list[int]]] = [[] for _ in range(self.batch_size)]  # finished, best first
        self.end_beams_penalized_scores: list[list[float]] = [[] for _ in range(self.batch_size)]
        self.cached_beam_scores: Tensor | None = None  # [B, nb] cumulative log-probs of the live beams
        # Per (element, beam): n-gram prefix -> tokens banned after it.
        self.cached_beam_ngram_bans: list[list[dict[tuple[int, ...], frozenset[int]]]] = [
            [{} for _ in range(self.num_beams)] for _ in range(self.batch_size)
        ]
        self.length_generated = 0
        self._padding = [0] * self.batch_size  # left padding of each element's rows
        self._done = [False] * self.batch_size

    @property
    def is_done(self) -> bool:
        return all(self._done)

    def _penalty(self, length: int) -> float:
        return ((5.0 + length) / 6) ** self.length_penalty  # GNMT / OpenNMT magic numbers

    def _add_end_beams(self, score: float, beam: list[int], batch_idx: int) -> None:
        """Insert a finished beam by penalised score (before equal scores), keeping the best `num_beams`."""
        score = score / self._penalty(len(beam) - self._padding[batch_idx])
        scores = self.end_beams_penalized_scores[batch_idx]
        i = 0
        while i < len(scores) and scores[i] > score:
            i += 1
        self.end_beams[batch_idx].insert(i, beam)
        scores.insert(i, score)
        del self.end_beams[batch_idx][self.num_beams :], scores[self.num_beams :]

    def forward(
        self, logits: Tensor, tokens: Tensor, context_lengths: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """One step: logits [B, nb, V], tokens [B, nb, L] -> tokens [B, num_beams, L+1] and the source beam
        [B, num_beams] (an index into the input's nb beams) of each new beam.

        context_lengths[b]: element b's own context length; what precedes it in its rows is left padding
        (default: no padding).
        """
        batch, beams, vocab = logits.shape
        length = tokens.shape[-1]
        if batch > self.batch_size:
            raise ValueError(f"batch {batch} exceeds the configured batch_size {self.batch_size}")
        if context_lengths is not None:
            padding = [length - self.length_generated - int(c) for c in context_lengths]
            if len(padding) != batch or min(padding) < 0:
                raise ValueError(
                    f"context_lengths {list(context_lengths)} do not fit tokens of length {length}"
                )
            self._padding[:batch] = padding
        own_lengths = [length - p for p in self._padding[:batch]]  # each element's own tokens
        n = self.ngram
        logits = logits.to(torch.float32, copy=True)  # [B, nb, V]
        for invalid in self.invalid_slices:
            logits[..., invalid] = NEG_INF
        if self.min_gen_length > self.length_generated and self.end_tokens:
            logits[..., list(self.end_tokens)] = NEG_INF
        # [B][nb][n-1] last n-1 tokens of each beam, the n-gram prefix before the next token; None for an
        # element whose own tokens are fewer (its padding is no prefix).
        tails: list[list[list[int]] | None] = [None] * batch
        if n > 0:
            last = tokens[..., length - min(n - 1, length) :].tolist()
            tails = [last[b] if own_lengths[b] >= n - 1 else None for b in range(batch)]
            banned = [
                (b, i, t)
                for b in range(batch)
                if tails[b] is not None
                for i in range(beams)
                for t in self.cached_beam_ngram_bans[b][i].get(tuple(tails[b][i]), ())
            ]
            if banned:
                logits[tuple(torch.tensor(banned, device=logits.device).T)] = NEG_INF

        prev = self.cached_beam_scores
        if prev is None:
            prev = torch.zeros(batch, beams, device=logits.device)
        scores = F.log_softmax(logits, dim=-1) + prev[..., None]  # [B, nb, V]
        # A fully masked beam row gives NaN; treat it as impossible.
        scores = scores.masked_fill(scores.isnan(), NEG_INF).view(batch, beams * vocab)  # [B, nb*V]

        k = min((max(1, len(self.end_tokens)) + 1) * self.num_beams, beams * vocab)
        per_row = _row_generators(self.generator, batch)
        if self.deterministic:
            cand = torch.topk(scores, k, dim=-1).indices  # [B, k]
        elif per_row is None:
            cand = sample_without_replacement(scores, k, self.generator)  # [B, k]
        else:  # a finished element draws nothing, as it would not alone; its beams no longer matter
            cand = torch.topk(scores, k, dim=-1).indices  # [B, k]
            live = [b for b in range(batch) if not self._done[b]]
            if live:
                cand[live] = sample_without_replacement(scores[live], k, [per_row[b] for b in live])
        cand_scores, order = scores.gather(1, cand).sort(dim=1, descending=True, stable=True)  # [B, k]
        cand = cand.gather(1, order)  # [B, k]
        cand_beams, cand_tokens = (cand // vocab).tolist(), (cand % vocab).tolist()
        cand_scores = cand_scores.tolist()

        sources, new_tokens, new_scores, new_bans = [], [], [], []
        for b in range(batch):
            kept: list[tuple[int, int, float]] = []  # (source beam, token, cumulative score)
            for src, tok, score in zip(cand_beams[b], cand_tokens[b], cand_scores[b], strict=True):
                if score == NEG_INF:
                    break  # sorted: only masked candidates and dead beams remain
                if not self._done[b] and tok in self.end_tokens:
                    self._add_end_beams(score, [*tokens[b, src].tolist(), tok], b)
                elif len(kept) < self.num_beams:
                    kept.append((src, tok, score))
                else:
                    break
            # Too few continuations: pad with dead copies of the best kept beam (or of the top candidate).
            src, tok, _ = kept[0] if kept else (cand_beams[b][0], cand_tokens[b][0], NEG_INF)
            kept += [(src, tok, NEG_INF)] * (self.num_beams - len(kept))
            sources.append([s for s, _, _ in kept])
            new_tokens.append([t for _, t, _ in kept])
            new_scores.append([s for _, _, s in kept])
            if n > 0:
                bans_b = []
                for src, tok, _ in kept:
                    bans = dict(self.cached_beam_ngram_bans[b][src])  # values are frozensets: safe to share
                    if tails[b] is not None:
                        key = tuple(tails[b][src])
                        bans[key] = bans.get(key, frozenset()) | {tok}
                    bans_b.append(bans)
                new_bans.append(bans_b)
        if n > 0:
            self.cached_beam_ngram_bans[:batch] = new_bans

        source = torch.tensor(sources, dtype=torch.long, device=tokens.device)  # [B, num_beams]
        appended = torch.tensor(new_tokens, dtype=tokens.dtype, device=tokens.device)  # [B, num_beams]
        rows = torch.arange(batch, device=tokens.device)[:, None]  # [B, 1]
        tokens = torch.cat((tokens[rows, source], appended[..., None]), dim=-1)  # [B, num_beams, L+1]
        self.cached_beam_scores = torch.tensor(new_scores, device=logits.device)  # [B, num_beams]
        self.length_generated += 1

        for b in range(self.batch_size):
            if self._done[b]:
                continue
            if b >= batch:  # elements the caller no longer passes count as done (as the original)
                self._done[b] = True
                continue
            best = max(new_scores[b])
            finished = self.end_beams_penalized_scores[b]
            # Done when no live beam can beat the worst kept finished beam (the original's heuristic bound),
            # or when no live beam is left at all.
            if best == NEG_INF or (
                len(finished) == self.num_beams and finished[-1] >= best / self._penalty(own_lengths[b] + 1)
            ):
                self._done[b] = True
        return tokens, source

    def finalize(self, tokens: Tensor) -> list[list[list[int]]]:
        """Per batch element its output beams, best first; resets the state.

        consider_end: the finished beams, plus the live beams of elements not yet done. Otherwise: the live
        beams by cumulative score. Dead (padding) beams are left out.
        """
        batch, beams, _ = tokens.shape
        seqs = tokens.tolist()  # [B][nb][L]
        scores = (
            [[0.0] * beams] * batch if self.cached_beam_scores is None else self.cached_beam_scores.tolist()
        )
        out = []
        for b in range(batch):
            live = sorted((i for i in range(beams) if scores[b][i] > NEG_INF), key=lambda i: -scores[b][i])
            if self.consider_end:
                if not self._done[b]:
                    for i in live:
                        self._add_end_beams(scores[b][i], seqs[b][i], b)
                out.append([_cut(beam) for beam in self.end_beams[b]])
            else:
                out.append([_cut(seqs[b][i]) for i in live])
        self._init_cache()
        return out
