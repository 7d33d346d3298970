"""The one place strategies are made from generation options, and the tokens none of them may generate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from glm.decoding.options import GenerationOptions
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy, Generators

if TYPE_CHECKING:
    from glm.tokenizer import GLMTokenizer


def make_strategy(
    options: GenerationOptions,
    batch_size: int,
    end_tokens: list[int],
    invalid_slices: Sequence[slice] = (),
    generator: Generators = None,
) -> BaseStrategy | BeamSearchStrategy:
    """The strategy `options` ask for, over `batch_size` elements."""
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
            generator=generator,
        )
    return BaseStrategy(
        batch_size,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        end_tokens=end_tokens,
        invalid_slices=invalid_slices,
        generator=generator,
    )


def banned_tokens(tokenizer: GLMTokenizer) -> list[slice]:
    """Ids never generated: the mask tokens (one would be filled next, without end) and the embedding's
    padding rows past the tokenizer's vocabulary (they decode to nothing); the original allowed both."""
    masks = sorted(tokenizer.mask_ids.values())
    return [slice(masks[0], masks[-1] + 1), slice(tokenizer.vocab_size, None)]
