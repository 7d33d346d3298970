"""GLM-130B-style blank-infilling language models in plain PyTorch.

The names below are imported on first use (PEP 562), so `import glm.generate` (a command line's parser,
its --help) does not import torch.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from glm.lazy import lazy_exports

# NumPy is not a dependency (nothing here uses it); torch warns at import when it is absent.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

if TYPE_CHECKING:
    from glm.api import DEFAULT_MODEL, load
    from glm.config import PRESETS, GLMConfig, get_preset
    from glm.decoding.batch import generate
    from glm.decoding.infill import Answer, fill_blanks
    from glm.decoding.options import GenerationOptions
    from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
    from glm.loading import load_model
    from glm.model import GLM, KVCache
    from glm.tokenizer import GLMTokenizer

_EXPORTS = {
    "DEFAULT_MODEL": "glm.api",
    "load": "glm.api",
    "PRESETS": "glm.config",
    "GLMConfig": "glm.config",
    "get_preset": "glm.config",
    "generate": "glm.decoding.batch",
    "Answer": "glm.decoding.infill",
    "GenerationOptions": "glm.decoding.options",
    "fill_blanks": "glm.decoding.infill",
    "load_model": "glm.loading",
    "GLM": "glm.model",
    "KVCache": "glm.model",
    "BaseStrategy": "glm.decoding.strategies",
    "BeamSearchStrategy": "glm.decoding.strategies",
    "GLMTokenizer": "glm.tokenizer",
}

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
