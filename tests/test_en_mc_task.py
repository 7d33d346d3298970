"""The shipped MMLU subset (tasks/offline/en_mmlu): well-formed mul jsonl, and a CLI run on it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from scoring_oracle import choice_positions, per_choice_scores

from glm.evaluate import cli
from glm.evaluation.dataset import encode_choice
from tools.build_eval_sets import multiple_choice_item

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tasks/offline/en_mmlu/test.jsonl"


def test_mmlu_jsonl_is_well_formed() -> None:
    raw = DATA.read_bytes()
    items = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert len(items) == 569 and len(raw) < 300_000
    for item in items:
        assert set(item) == {"inputs_pretokenized", "choices_pretokenized", "label"}
        choices = item["choices_pretokenized"]
        assert len(choices) == 4 and len(set(choices)) == 4 and all(c and c == c.strip() for c in choices)
        assert isinstance(item["label"], int) and 0 <= item["label"] < 4
        assert item["inputs_pretokenized"] and "[MASK]" not in item["inputs_pretokenized"]
    assert len({item["label"] for item in items}) == 4
    manifest = json.loads((REPO / "tasks/offline/manifest.json").read_text())
    entry = manifest["files"]["en_mmlu/test.jsonl"]
    assert entry == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "items": 569}


def test_multiple_choice_item_conversion() -> None:
    record = {
        "question": "Fog is likely around:  ",
        "options": "\nA. a marsh\nB. a desert",
        "answer": "A. a marsh",
    }
    assert multiple_choice_item(record) == {
        "inputs_pretokenized": "Fog is likely around:",
        "choices_pretokenized": ["a marsh", "a desert"],
        "label": 0,
    }
    with pytest.raises(ValueError):
        multiple_choice_item(record | {"answer": "B. a marsh"})  # letter and text disagree


def test_mmlu_task_accuracy_equals_each_choice_alone(tiny_checkpoint, tiny_model, tmp_path, capsys) -> None:
    model, tokenizer = tiny_model
    args = [REPO / "tasks/offline/en_mmlu.yaml", "--limit", "5", "--output-dir", tmp_path]
    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in [*args, "--checkpoint", tiny_checkpoint]])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "> Successfully load 1 task\n" in out and "Finish test.jsonl, Accuracy = " in out
    (results,) = tmp_path.glob("evaluate-*.json")
    (task,) = json.loads(results.read_text())["tasks"]
    assert task["name"] == "en_mmlu"
    (group,) = task["groups"].values()
    (entry,) = group["files"].values()

    correct = 0  # each choice scored alone after the plain-text question and an appended [MASK]
    mask = tokenizer.get_command("[MASK]")
    for item in [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:5]]:
        context = [*tokenizer.tokenize(item["inputs_pretokenized"]), mask]
        choices = [encode_choice(tokenizer, c) for c in item["choices_pretokenized"]]
        scores = per_choice_scores(
            model, context, choices, tokenizer.sop_id, choice_positions(len(context), len(context) - 1)
        )
        correct += max(range(4), key=scores.__getitem__) == item["label"]
    assert entry["samples"] == 5 and entry["metrics"]["Accuracy"] == pytest.approx(100 * correct / 5)
