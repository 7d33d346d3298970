"""The generation options of the original generate.py, validated; importable without torch (the CLI's
parser is built from them before torch loads)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

STRATEGIES = ("BaseStrategy", "BeamSearchStrategy")


def _at_least(low: int):
    def check(value: Any) -> str | None:
        return (
            None if isinstance(value, int) and value >= low else f"must be an integer >= {low}, got {value}"
        )

    return check


def _finite(value: Any) -> str | None:
    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def _positive(value: Any) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be a positive number, got {value}"


def _probability(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be between 0 and 1, got {value}"  # NaN fails too


def _optional(check):
    return lambda value: None if value is None else check(value)


def _strategy(value: Any) -> str | None:
    return None if value in STRATEGIES else f"must be {' or '.join(STRATEGIES)}, got '{value}'"


# Each option's check: None when the value is valid, else what is wrong with it.
CHECKS = {
    "sampling_strategy": _strategy,
    "out_seq_length": _at_least(2),
    "max_new_tokens": _optional(_at_least(1)),
    "min_gen_length": _at_least(0),
    "num_beams": _at_least(1),
    "length_penalty": _finite,
    "no_repeat_ngram_size": _at_least(0),
    "temperature": _positive,
    "top_k": _at_least(0),
    "top_p": _probability,
    "deterministic": lambda value: None if isinstance(value, bool) else f"must be True or False, got {value}",
}


def check_option(name: str, value: Any) -> str | None:
    """What is wrong with `value` for option `name`, or None."""
    return CHECKS[name](value)


@dataclass
class GenerationOptions:
    """The generation flags of the original generate.py, with its defaults (scripts/generate.sh's)."""

    sampling_strategy: str = "BaseStrategy"
    out_seq_length: int = 256  # counts the context, as in the original
    max_new_tokens: int | None = None  # at most this many tokens per blank (None: out_seq_length only)
    min_gen_length: int = 0
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.7
    deterministic: bool = False  # beam search: top candidates instead of sampled ones

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = check_option(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"{f.name} {problem}")
