"""GLM-130B-style blank-infilling language models in plain PyTorch."""

from glm.api import DEFAULT_MODEL, load
from glm.config import PRESETS, GLMConfig, get_preset
from glm.decoding import generate
from glm.infill import Answer, GenerationOptions, fill_blanks
from glm.loading import load_model
from glm.model import GLM, KVCache
from glm.strategies import BaseStrategy, BeamSearchStrategy
from glm.tokenizer import GLMTokenizer

__all__ = [
    "DEFAULT_MODEL",
    "GLM",
    "PRESETS",
    "Answer",
    "BaseStrategy",
    "BeamSearchStrategy",
    "GLMConfig",
    "GLMTokenizer",
    "GenerationOptions",
    "KVCache",
    "fill_blanks",
    "generate",
    "get_preset",
    "load",
    "load_model",
]
