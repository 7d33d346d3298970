"""The shipped default model: intact files, loads with no flags, and reproduces its recorded infills."""

from __future__ import annotations

import json

import pytest

from glm.api import DEFAULT_MODEL, load
from glm.decoding.infill import fill_blanks
from tools.ship_model import GREEDY, GREEDY_PROMPTS, checksums


def test_files_match_their_checksums():
    recorded = dict(
        reversed(line.split("  ", 1)) for line in (DEFAULT_MODEL / "SHA256SUMS").read_text().splitlines()
    )
    assert recorded == checksums(DEFAULT_MODEL)
    assert "release/mp_rank_00_model_states.pt" in recorded and "tokenizer.model" in recorded


@pytest.fixture(scope="module")
def bundled():
    return load()


def test_loads_as_the_default_with_its_tokenizer(bundled):
    model, tokenizer = bundled
    assert model.config.vocab_size >= tokenizer.vocab_size
    text = "Tsinghua University is in Beijing.\n清华大学位于北京。"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_greedy_infills_are_the_recorded_ones(bundled):
    model, tokenizer = bundled
    recorded = json.loads((DEFAULT_MODEL / "greedy_infills.json").read_text())
    assert list(recorded) == GREEDY_PROMPTS
    answers = fill_blanks(model, tokenizer, GREEDY_PROMPTS, GREEDY)
    assert {p: a.text(tokenizer) for p, (a,) in zip(GREEDY_PROMPTS, answers, strict=True)} == recorded
