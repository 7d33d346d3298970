"""Build tasks/finetune/text_kind: a 3-way multiple-choice task for the fine-tuning evidence (README:
Fine-tuning), from the bundled offline evaluation sets, deterministic (seed 0).

Each item is a short text and the question what kind of text it is: English prose (a paragraph of the
LAMBADA-style cloze, its first 40 words), an English exam question (the MMLU subset) or a Chinese sentence
(the idiom cloze, its blank filled with the gold idiom). The choices are the same three words for every
item; the base model knows no such labels, a fine-tuned adapter learns them. Items are split by text into
train (200 per kind), valid (20, the loss watched while training) and test (100), so no test text is
seen in training.

    python tools/build_finetune_task.py      # writes tasks/finetune/text_kind/{train,valid,test}.jsonl
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OFFLINE = REPO / "tasks" / "offline"
OUTPUT = REPO / "tasks" / "finetune" / "text_kind"
CHOICES = ["prose", "a question", "Chinese"]
TRAIN, VALID, TEST = 200, 20, 100


def read(name: str) -> list[dict]:
    lines = (OFFLINE / name / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def texts() -> list[list[str]]:
    """The texts of each kind, in CHOICES order."""
    prose = [" ".join(item["inputs_pretokenized"].split()[:40]) for item in read("en_lambada_cloze")]
    questions = [" ".join(item["inputs_pretokenized"].split()[:40]) for item in read("en_mmlu")]
    chinese = [
        item["inputs_pretokenized"].replace("[MASK]", item["choices_pretokenized"][item["label"]])
        for item in read("zh_idiom_cloze")
    ]
    return [sorted(set(kind)) for kind in (prose, questions, chinese)]


def write(path: Path, items: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    os.replace(tmp, path)


def main(seed: int = 0) -> None:
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for label, kind in enumerate(texts()):
        chosen = rng.sample(kind, TRAIN + VALID + TEST)
        parts = {
            "train": chosen[:TRAIN],
            "valid": chosen[TRAIN : TRAIN + VALID],
            "test": chosen[TRAIN + VALID :],
        }
        for split, part in parts.items():
            splits[split] += [
                {"inputs_pretokenized": f"{t}\nThis text is", "choices_pretokenized": CHOICES, "label": label}
                for t in part
            ]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        rng.shuffle(items)
        write(OUTPUT / f"{split}.jsonl", items)
        print(f"{OUTPUT / split}.jsonl: {len(items)} items")


if __name__ == "__main__":
    main()
