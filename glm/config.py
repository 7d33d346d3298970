"""Model configuration: one dataclass and named presets."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GLMConfig:
    """Shape of a GLM-130B-architecture model (the fields SwissArmyTransformer's GLM130B takes)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    inner_hidden_size: int
    vocab_size: int
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    # GLM-130B ran on SAT 0.2.12, whose rotary tables were computed in fp16 (angle errors up to ~1 rad near
    # position 2047). False gives exact fp32 tables, as SAT 0.4 in fp32 (what the reference outputs use).
    rotary_fp16_tables: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        return (2 * self.num_layers) ** 0.5

    def num_parameters(self) -> int:
        h, inner = self.hidden_size, self.inner_hidden_size
        per_layer = (
            4 * h  # two LayerNorms
            + 3 * h * h
            + 3 * h  # query_key_value
            + h * h
            + h  # attention dense
            + 2 * inner * h
            + 2 * inner  # dense_h_to_4h (GeGLU: value and gate halves)
            + inner * h
            + h  # dense_4h_to_h
        )
        return self.vocab_size * h + self.num_layers * per_layer + 2 * h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> GLMConfig:
        """Build from a dict, rejecting unknown keys with the nearest valid name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ValueError(f"{source}: unknown model config key '{key}'{hint}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model config {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not valid JSON: {e}") from None
        return cls.from_dict(values.get("model", values), source=str(path))


PRESETS: dict[str, GLMConfig] = {
    "glm-130b": GLMConfig(
        num_layers=70,
        hidden_size=12288,
        num_attention_heads=96,
        inner_hidden_size=32768,
        vocab_size=150528,
        max_sequence_length=2048,
    ),
    # GLM-130B's shape scaled to about 0.6 B parameters: the benchmark model.
    "glm-600m": GLMConfig(
        num_layers=16,
        hidden_size=1536,
        num_attention_heads=12,
        inner_hidden_size=4096,
        vocab_size=50048,
        max_sequence_length=2048,
    ),
    # The shape of the original implementation's golden outputs in shared/reference/sat_tiny.
    "sat-tiny": GLMConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        inner_hidden_size=160,
        vocab_size=1000,
        max_sequence_length=128,
    ),
}


def get_preset(name: str) -> GLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}") from None
