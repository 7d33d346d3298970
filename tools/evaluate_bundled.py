"""The bundled model's model-card numbers: the evaluator (`glm.evaluate`) on tasks/offline/*.yaml.

    python tools/evaluate_bundled.py [--checkpoint DIR] [--output docs/bundled-model/eval.json] [--limit N]

Runs `python -m glm.evaluate tasks/offline --checkpoint ...`, copies its results JSON to `--output`, and
prints the model card's table: every task's metrics with a baseline that needs no model (chance for the
multiple-choice sets; for the LAMBADA-style set, always answering `--baseline-word`, the most frequent
qualifying final word of the training split). Extra flags go to the evaluator (e.g. `--limit 20`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks" / "offline"


def file_metrics(report: dict[str, Any], task: str) -> dict[str, float]:
    """The metrics of a task's one data file."""
    (entry,) = [t for t in report["tasks"] if t["name"] == task]
    (files,) = [group["files"] for group in entry["groups"].values()]
    ((_, result),) = files.items()
    return result["metrics"]


def baselines(tasks: Path, word: str) -> dict[str, float]:
    """Accuracy (%) of answering without a model: chance for each multiple-choice set, always `word` for
    the LAMBADA-style one."""
    from glm.evaluation.dataset import read_jsonl

    result = {}
    for name in ("zh_idiom_cloze", "en_mmlu"):
        items = read_jsonl(tasks / name / "test.jsonl")
        result[name] = 100 * sum(1 / len(i["choices_pretokenized"]) for i in items) / len(items)
    items = read_jsonl(tasks / "en_lambada_cloze" / "test.jsonl")
    result["en_lambada_cloze"] = (
        100 * sum(i["targets_pretokenized"][0].strip() == word for i in items) / len(items)
    )
    return result


def card_table(report: dict[str, Any], base: dict[str, float], word: str) -> str:
    rows = [("metric", "model", "baseline")]
    for lang, name in (("English", "en_lm"), ("Chinese", "zh_lm")):
        metrics = file_metrics(report, name)
        rows.append((f"{lang} perplexity per token", f"{metrics['PPL_token']:,.1f}", ""))
        rows.append((f"{lang} bits per byte", f"{metrics['BPB_text']:.3f}", ""))
        rows.append((f"{lang} perplexity per word (the original's count)", f"{metrics['PPL']:,.1f}", ""))
    rows.append(
        (
            "English LAMBADA-style last word, accuracy",
            f"{file_metrics(report, 'en_lambada_cloze')['Accuracy']:.1f} %",
            f"{base['en_lambada_cloze']:.1f} % (always '{word}')",
        )
    )
    rows.append(
        (
            "English MMLU subset (4-way), accuracy",
            f"{file_metrics(report, 'en_mmlu')['Accuracy']:.1f} %",
            f"{base['en_mmlu']:.1f} % (chance)",
        )
    )
    rows.append(
        (
            "Chinese idiom cloze (7-way), accuracy",
            f"{file_metrics(report, 'zh_idiom_cloze')['Accuracy']:.1f} %",
            f"{base['zh_idiom_cloze']:.1f} % (chance)",
        )
    )
    lines = ["| metric | model | baseline |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows[1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "models" / "glm-bilingual"))
    parser.add_argument("--tasks", type=Path, default=TASKS, help="folder of the offline task YAMLs")
    parser.add_argument("--output", type=Path, help="copy the evaluator's results JSON here")
    parser.add_argument("--baseline-word", default="them", help="the LAMBADA-style baseline's answer")
    args, evaluator_args = parser.parse_known_args(argv)

    from glm.evaluate import build_parser
    from glm.evaluate import main as evaluate

    with tempfile.TemporaryDirectory() as logs:
        command = [
            str(args.tasks),
            "--checkpoint",
            args.checkpoint,
            "--data-path",
            str(REPO),
            "--output-dir",
            logs,
        ]
        evaluator = build_parser().parse_args([*command, *evaluator_args])
        evaluator.argv = [*command[:-2], *evaluator_args]
        try:
            status = evaluate(evaluator)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if status:
            return status
        (results,) = Path(logs).glob("evaluate-*.json")
        report = json.loads(results.read_text(encoding="utf-8"))
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(results, args.output)
    print(card_table(report, baselines(args.tasks, args.baseline_word), args.baseline_word))
    print(f"({report['seconds']:.0f} s on {report['device']}, {report['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
