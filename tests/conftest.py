from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glm.config import GLMConfig, get_preset
from glm.loading import load_model
from glm.model import GLM

SAT_TINY = Path(__file__).parent / "data" / "sat_tiny"


@pytest.fixture(scope="session")
def reference() -> dict:
    """Outputs of the original implementation (SwissArmyTransformer 0.4.12) on the sat_tiny checkpoint."""
    return torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def sat_tiny() -> GLM:
    model, _ = load_model(SAT_TINY / "ckpt", config=get_preset("sat-tiny"))
    return model


def tiny_config(**overrides) -> GLMConfig:
    values = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        inner_hidden_size=48,
        vocab_size=64,
        max_sequence_length=64,
    )
    return GLMConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small untrained bilingual model with its sentencepiece tokenizer, in the project's format."""
    from tools.build_untrained_model import main as build

    return build(tmp_path_factory.mktemp("models") / "tiny", vocab_size=600, seed=0, overwrite=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def live_server() -> str:
    """glm-serve with the bundled model on 127.0.0.1 (no API key), shared by the chat and playground tests:
    2 groups of 3 rows, 512 positions (room for a stream long enough to be stopped)."""
    from test_serve import start_server, stop_server

    process, url = start_server("--groups", "2", "--width", "3", max_length=512)
    yield url
    stop_server(process)
