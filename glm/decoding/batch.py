"""`generate`: a batch of contexts decoded under one strategy, as one request of the engine.

The inputs follow GLM-130B's blank infilling (glm.query). Every sample gets its own positions and
mask, so a batch gives each sample the logits it would get alone; the strategy is told each sample's own
context length, so its choices (beam search's length penalty and n-gram bans) do not depend on the padding
either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from glm.decoding.engine import Engine
from glm.decoding.requests import Request
from glm.decoding.rows import MAX_PREFILL_TOKENS
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.model import GLM


@torch.no_grad()
def generate(
    model: GLM,
    contexts: Sequence[Sequence[int]],
    strategy: BaseStrategy | BeamSearchStrategy,
    max_gen_length: int,
    mask_positions: Sequence[int | None] | None = None,
    on_step: Callable[[Tensor], None] | None = None,
    unidirectional: bool = False,
    max_prefill_tokens: int = MAX_PREFILL_TOKENS,
) -> list[list[list[int]]]:
    """Generate up to max_gen_length tokens after each context (each ending in `sop`).

    `strategy` is a BaseStrategy or BeamSearchStrategy over the whole batch. `on_step` receives the
    generated tokens so far, [B, beams, g], after every step (for streaming). Returns, per context, its
    output beams best first: the context followed by the generated tokens (an end token, if produced,
    included). Context i runs in group i of an engine of its own, its beams in the group's rows, the
    contexts prefilled together (right-padded forwards of at most `max_prefill_tokens` padded tokens).
    """
    if max_gen_length < 1:
        raise ValueError(f"max_gen_length must be at least 1, got {max_gen_length}")
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least the sop token")
    prompts = [list(c) for c in contexts]
    masks = list(mask_positions) if mask_positions is not None else [None] * len(prompts)
    padded = max(map(len, prompts))
    engine = Engine(
        model,
        groups=len(prompts),
        width=strategy.num_beams,
        max_length=padded + max_gen_length,
        max_prefill_tokens=max_prefill_tokens,
    )
    request = Request(
        prompts[0],
        strategy,
        max_gen_length,
        mask_position=masks[0],
        unidirectional=unidirectional,
        on_step=None if on_step is None else lambda r: on_step(r.tokens[:, :, padded:]),
        prompts=prompts,
        mask_positions=masks,
    )
    engine.run([request])
    assert request.beams is not None
    return [
        [beam[padded - len(p) :] for beam in beams] for beams, p in zip(request.beams, prompts, strict=True)
    ]
