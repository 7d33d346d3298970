"""The decoding strategies' public path: `glm.decoding.strategies` holds them."""

from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy

__all__ = ["BaseStrategy", "BeamSearchStrategy"]
