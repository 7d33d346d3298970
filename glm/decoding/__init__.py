"""Decoding: generation options, strategies, the engine and its requests, blank filling.

- options.py     the generation options and their checks (no torch: the CLI parses before loading it)
- strategies.py  sampling and beam search
- factory.py     `make_strategy` (every front end's one way to a strategy) and the banned tokens
- rows.py        the engine's KV cache of rows: prefill and decode_one_token
- requests.py    requests, outputs, penalties and log-probs
- engine.py      continuous batching of requests
- batch.py       `generate`: a batch of contexts under one strategy, one engine request
- infill.py      blank filling of text (`fill_blanks`)

A query's ids, positions and attention mask are laid out by glm/query.py, below this package (training
and scoring use the same layout).

The names below are imported on first use (PEP 562), so importing `glm.decoding.options` does not import
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glm.lazy import lazy_exports

if TYPE_CHECKING:
    from glm.decoding.batch import generate
    from glm.decoding.engine import Engine
    from glm.decoding.factory import banned_tokens, make_strategy
    from glm.decoding.infill import Answer, fill_blanks, prepare_query
    from glm.decoding.options import GenerationOptions
    from glm.decoding.requests import Output, Request
    from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy

_EXPORTS = {
    "generate": "glm.decoding.batch",
    "Engine": "glm.decoding.engine",
    "banned_tokens": "glm.decoding.factory",
    "make_strategy": "glm.decoding.factory",
    "Answer": "glm.decoding.infill",
    "fill_blanks": "glm.decoding.infill",
    "prepare_query": "glm.decoding.infill",
    "GenerationOptions": "glm.decoding.options",
    "Output": "glm.decoding.requests",
    "Request": "glm.decoding.requests",
    "BaseStrategy": "glm.decoding.strategies",
    "BeamSearchStrategy": "glm.decoding.strategies",
}

__all__ = [
    "Answer",
    "BaseStrategy",
    "BeamSearchStrategy",
    "Engine",
    "GenerationOptions",
    "Output",
    "Request",
    "banned_tokens",
    "fill_blanks",
    "generate",
    "make_strategy",
    "prepare_query",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
