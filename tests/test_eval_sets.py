"""The offline evaluation sets' construction rules and a smoke run of tools/evaluate_bundled.py."""

from __future__ import annotations

import json

from tools.build_eval_sets import NUM_CHOICES, final_word_item, idiom_items, lm_text
from tools.evaluate_bundled import PREFIX, first_word, main, windows


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


def test_windows_score_every_token_after_the_first_prefix_once() -> None:
    for n in (PREFIX + 1, 200, 201, 1000):
        scored = [t for _, middle, end in windows(n) for t in range(middle, end)]
        assert scored == list(range(PREFIX, n))
    assert windows(PREFIX) == []
    assert first_word("  Window, and more") == "Window"


def test_evaluate_bundled_smoke(tiny_checkpoint, tmp_path) -> None:
    tasks = tmp_path / "tasks"
    for name, text in {
        "en_lm/test.txt": "The cat sat on the mat.\nIt was happy.\n\nA second document.\n" * 20,
        "zh_lm/test.txt": "清华大学位于北京。\n\n床前明月光。\n" * 20,
        "en_lambada_cloze/test.jsonl": json.dumps(
            {"inputs_pretokenized": "Hello", "targets_pretokenized": ["you"]}
        ),
        "zh_idiom_cloze/test.jsonl": json.dumps(
            {"inputs_pretokenized": "他[MASK]。", "choices_pretokenized": ["一心一意"] * 7, "label": 0},
            ensure_ascii=False,
        ),
    }.items():
        (tasks / name).parent.mkdir(parents=True, exist_ok=True)
        (tasks / name).write_text(text + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    args = ["--checkpoint", str(tiny_checkpoint), "--tasks", str(tasks), "--corpus", str(tmp_path / "none")]
    assert main([*args, "--limit", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["lm"]["en"]["ppl_token"] > 1 and "unigram_ppl_token" not in results["lm"]["en"]
    assert results["lambada"]["items"] == 1 and results["idioms"]["accuracy"] == 1.0  # identical choices
