"""What the engine is asked and what it answers: requests, their penalties, outputs and log-probs.

Requests carry their own strategy (batch size 1 or `n`), budget, stop ids and strings, random generator,
penalties and log-probs, so a request gets the same tokens in any batch as alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy

Strategy = BaseStrategy | BeamSearchStrategy


@dataclass
class Penalties:
    """Repetition (CTRL / HF: a seen token's logit divided by it if positive, multiplied if negative;
    prompt and generated tokens), presence and frequency (OpenAI: minus presence if generated at all, minus
    frequency per time generated). All off by default."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0


@dataclass
class TokenLogprobs:
    """Log-probs (of the model's distribution, before temperature, filters and penalties) of the chosen
    token and the `top` most likely ones."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """One output of a request: the generated ids (without the end token), why it ended ("stop": an end
    token, stop id or stop string; "length": the budget), and its log-probs when asked for."""

    ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    text: str | None = None  # cut before a stop string, when stop strings were given


@dataclass(eq=False)
class Request:
    """A prompt (ending in `sop`) and how to continue it.

    `strategy` decides every token: a BaseStrategy over `strategy.batch_size` rows (independent samples of
    the prompt) or a BeamSearchStrategy of batch size 1. End tokens belong in the strategy; `stop_strings`
    need the engine's `detokenize`. `on_step(request)` is called after every step (streaming),
    `on_finish(request)` once `outputs` is set.

    A batch under one strategy (`glm.decoding.generate`): `prompts[e]` and `mask_positions[e]` are element
    e's, each element in a group of its own (`prompt` and `mask_position` are element 0's); its rows in
    `tokens` are left-padded to the longest prompt. Penalties, stop strings and log-probs are not for
    batches.
    """

    prompt: list[int]
    strategy: Strategy
    max_new_tokens: int
    mask_position: int | None = None  # None: [gMASK] positions continue after the prompt
    unidirectional: bool = False
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k alternatives
    penalties: Penalties = field(default_factory=Penalties)
    on_step: Callable[[Request], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    tag: Any = None  # the caller's
    prompts: list[list[int]] = field(default_factory=list)  # a batch: one prompt per strategy element
    mask_positions: list[int | None] = field(default_factory=list)

    # state, set by the engine
    outputs: list[Output] | None = None
    error: BaseException | None = None
    cancelled: bool = False
    tokens: Tensor | None = None  # [elements, beams, offset + generated]
    beams: list[list[list[int]]] | None = None  # the strategy's final beams per element, prompt included
    steps: int = 0
    _places: list[tuple[int, list[int]]] = field(default_factory=list)  # (group, rows) it holds
    _logprobs: list[list[TokenLogprobs]] = field(default_factory=list)  # per row (sampling)
    _stopped: list[str | None] = field(default_factory=list)  # per row: the text cut at a stop string
    _counts: Tensor | None = None  # [rows, V] generated-token counts (penalties)

    @property
    def width(self) -> int:
        """Rows the request takes in each of its groups."""
        return self.strategy.num_beams if self.prompts else self.strategy.batch_size * self.strategy.num_beams

    @property
    def elements(self) -> list[tuple[list[int], int | None]]:
        """Each strategy element's prompt and mask position."""
        if self.prompts:
            return list(zip(self.prompts, self.mask_positions or [None] * len(self.prompts), strict=True))
        return [(self.prompt, self.mask_position)] * self.strategy.batch_size

    @property
    def offset(self) -> int:
        """Where the generated tokens start in `tokens`: after the longest prompt."""
        return max(map(len, self.prompts)) if self.prompts else len(self.prompt)

    @property
    def done(self) -> bool:
        return self.outputs is not None

    def generated(self, row: int = 0) -> list[int]:
        """Row `row`'s generated ids so far, before an end token; for beam search row 0 is the best live
        beam."""
        if self.tokens is None:
            return []
        flat = self.tokens.view(-1, self.tokens.shape[-1])
        end = strategy_of(self).end_tokens
        out = []
        for token in flat[row, self.offset :].tolist():
            if token < 0 or token in end:
                break
            out.append(token)
        return out

    def settled(self) -> list[int]:
        """Generated ids no later step can change: for beam search, the prefix that every live and finished
        beam shares (beam search's streaming); for sampling, row 0's tokens."""
        if not isinstance(strategy_of(self), BeamSearchStrategy) or self.tokens is None:
            return self.generated(0)
        n = self.offset
        beams = [row[n:] for row in self.tokens[0].tolist()]
        beams += [list(b[n:]) for b in strategy_of(self).end_beams[0]]
        common = beams[0]
        for beam in beams[1:]:
            k = 0
            while k < min(len(common), len(beam)) and common[k] == beam[k]:
                k += 1
            common = common[:k]
        end = set(self.strategy.end_tokens)
        cut = next((i for i, t in enumerate(common) if t in end or t < 0), len(common))
        return common[:cut]


class QueueFull(Exception):
    """The engine's waiting queue is full."""


def strategy_of(request: Request) -> Strategy:
    """The request's own strategy (unwrapped from the tensor-parallel synchronisation)."""
    return getattr(request.strategy, "strategy", request.strategy)
