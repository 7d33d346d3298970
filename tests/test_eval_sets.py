"""The offline evaluation sets' construction rules, and tools/evaluate_bundled.py (the model card) as the
evaluator on the task YAMLs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from scoring_oracle import choice_positions, per_choice_scores

from glm.evaluation.dataset import encode_choice
from tools.build_eval_sets import NUM_CHOICES, final_word_item, idiom_items, lm_text
from tools.evaluate_bundled import main

REPO = Path(__file__).resolve().parent.parent


def test_final_word_item_rules() -> None:
    filler = " ".join(["word"] * 59)
    assert final_word_item(f"{filler} window.”") == (filler, "window")
    assert final_word_item(f"{filler} it.") is None  # fewer than 3 letters
    assert final_word_item(f"{filler} don't.") is None  # not alphabetic
    assert final_word_item(" ".join(["word"] * 30) + " end.") is None  # fewer than 60 words
    text = " ".join(["x"] * 20) + " end. Four five six " + " ".join(["y"] * 60) + " target."
    context, target = final_word_item(text, max_context_words=75)
    assert target == "target" and context.startswith("Four five six y")  # cut at a sentence start


def test_idiom_items() -> None:
    idioms = [{"word": f"成语{i:02d}", "example": f"第{i}句话里有～呢，好。★某书"} for i in range(20)]
    idioms.append({"word": "太长的成语", "example": "这句有～不行。"})  # not four characters
    items = idiom_items(idioms, limit=5, seed=0)
    assert items == idiom_items(idioms, limit=5, seed=0) and len(items) == 5
    for item in items:
        choices, text = item["choices_pretokenized"], item["inputs_pretokenized"]
        assert len(set(choices)) == NUM_CHOICES and all(len(c) == 4 for c in choices)
        assert text.count("[MASK]") == 1 and "★" not in text
        assert text == f"第{int(choices[item['label']][2:])}句话里有[MASK]呢，好。"


def test_lm_text_takes_whole_documents() -> None:
    documents = [[f"doc {i} line {j}" for j in range(3)] for i in range(50)]
    text = lm_text(documents, 200, seed=0, name="en")
    assert text == lm_text(documents, 200, seed=0, name="en")
    chosen = text.strip("\n").split("\n\n")
    assert all(d.split("\n") in documents for d in chosen) and 200 <= len(text.encode()) <= 230


def test_evaluate_bundled_runs_the_evaluator_on_the_yamls(
    tiny_checkpoint, tiny_model, tmp_path, capsys
) -> None:
    """The model-card numbers are the evaluator's on the task YAMLs; the baselines are hand-computed."""
    model, tokenizer = tiny_model
    offline = tmp_path / "tasks/offline"
    shutil.copytree(
        REPO / "tasks/offline", offline, ignore=shutil.ignore_patterns("*.jsonl", "*.txt", "*.json")
    )
    idiom = {
        "inputs_pretokenized": "他[MASK]。",
        "choices_pretokenized": ["一心一意", "三心二意"],
        "label": 1,
    }
    mmlu = {
        "inputs_pretokenized": "Fog?",
        "choices_pretokenized": ["a marsh", "a desert", "a sea", "ice"],
        "label": 0,
    }
    files = {
        "en_lm/test.txt": "The cat sat on the mat.\nIt was happy.\n\nA second document.\n" * 5,
        "zh_lm/test.txt": "清华大学位于北京。\n\n床前明月光。\n" * 5,
        "en_lambada_cloze/test.jsonl": "".join(
            json.dumps({"inputs_pretokenized": "Hello", "targets_pretokenized": [t]}) + "\n"
            for t in ("them", "you")
        ),
        "zh_idiom_cloze/test.jsonl": json.dumps(idiom, ensure_ascii=False) + "\n",
        "en_mmlu/test.jsonl": json.dumps(mmlu) + "\n",
    }
    for name, text in files.items():
        (offline / name).parent.mkdir(parents=True, exist_ok=True)
        (offline / name).write_text(text, encoding="utf-8")
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--tasks", str(offline), "--output", str(out)]
    assert main([*argv, "--data-path", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert sorted(t["name"] for t in report["tasks"]) == [
        "en_lambada_cloze",
        "en_lm",
        "en_mmlu",
        "zh_idiom_cloze",
        "zh_lm",
    ]
    table = capsys.readouterr().out

    context = tokenizer.tokenize_with_masks(idiom["inputs_pretokenized"])
    position = context.index(tokenizer.get_command("[MASK]"))
    choices = [encode_choice(tokenizer, c) for c in idiom["choices_pretokenized"]]
    scores = per_choice_scores(
        model, context, choices, tokenizer.sop_id, choice_positions(len(context), position)
    )
    accuracy = 100.0 * (max(range(2), key=scores.__getitem__) == 1)
    assert f"| Chinese idiom cloze (7-way), accuracy | {accuracy:.1f} % | 50.0 % (chance) |" in table
    assert "| English MMLU subset (4-way), accuracy | " in table and " | 25.0 % (chance) |" in table
    assert " | 50.0 % (always 'them') |" in table  # one of the two targets is "them"
    en_lm = next(t for t in report["tasks"] if t["name"] == "en_lm")
    metrics = en_lm["groups"]["test"]["files"]["test.txt"]["metrics"]
    assert f"| English perplexity per token | {metrics['PPL_token']:,.1f} |  |" in table
