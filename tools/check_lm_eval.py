"""Cross-check our multiple-choice Accuracy against lm-evaluation-harness's `acc` on the same data and model.

Runs the project's evaluator (`MultiChoiceTask`) on `tasks/offline/zh_idiom_cloze.yaml`, then lm-eval's
`simple_evaluate` with `glm.lm_eval_adapter.GLMLM` on a task defined from the same jsonl (loaded offline by
`datasets`' json builder): context = `inputs_pretokenized` (holding a written `[MASK]`, the blank for both:
the task's module and the adapter read it as the mask token), one continuation per choice with no target
delimiter, so both score every choice as the filling of the blank, in the same packed row. Exits 1 if they
differ. Needs `pip install lm_eval` (the `lm-eval` extra).

    python tools/check_lm_eval.py [--checkpoint models/glm-bilingual] [--limit 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_YAML = REPO_ROOT / "tasks" / "offline" / "zh_idiom_cloze.yaml"


def ours(model, tokenizer, limit: int) -> tuple[float, float, list[int]]:
    """Our Accuracy (a fraction), items/s and predicted choices, through the project's evaluator."""
    from glm.evaluation.config import load_task_config
    from glm.evaluation.tasks import task_class

    config = load_task_config(TASK_YAML)
    task = task_class(config)(model, tokenizer, config, REPO_ROOT, limit, save_predictions=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode():
        result = task.evaluate()
    seconds = time.perf_counter() - start
    [(metrics, count)] = [r for files in result.groups.values() for r in files.values()]
    return metrics["Accuracy"] / 100, count / seconds, [r["prediction"] for r in result.predictions]


def theirs(model, tokenizer, limit: int) -> tuple[float, float, list[int]]:
    """lm-eval's `acc`, items/s and predicted choices, with our model behind `GLMLM`."""
    from lm_eval import simple_evaluate

    from glm.lm_eval_adapter import make_lm_class

    task = {
        "task": "glm_zh_idiom_cloze",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(TASK_YAML.with_suffix("") / "test.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{inputs_pretokenized}}",
        "doc_to_choice": "{{choices_pretokenized}}",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    lm = make_lm_class()(model, tokenizer)
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task], limit=limit, bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - start
    samples = sorted(results["samples"]["glm_zh_idiom_cloze"], key=lambda s: s["doc_id"])
    scores = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return results["results"]["glm_zh_idiom_cloze"]["acc,none"], len(samples) / seconds, predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model folder (default: glm.api's bundled model)")
    parser.add_argument("--limit", type=int, default=200, help="first N items of the test file")
    args = parser.parse_args(argv)

    from glm.api import load

    model, tokenizer = load(args.checkpoint) if args.checkpoint else load()
    model.eval()
    our_acc, our_speed, our_predictions = ours(model, tokenizer, args.limit)
    their_acc, their_speed, their_predictions = theirs(model, tokenizer, args.limit)
    differ = sum(a != b for a, b in zip(our_predictions, their_predictions, strict=True))
    print(f"items: {args.limit} of {TASK_YAML.relative_to(REPO_ROOT)}")
    print(f"ours    Accuracy = {our_acc:.4f}  ({our_speed:.2f} items/s)")
    print(f"lm-eval acc      = {their_acc:.4f}  ({their_speed:.2f} items/s)")
    print(f"items whose predicted choice differs: {differ}")
    same = abs(our_acc - their_acc) < 1e-9 and differ == 0
    print("MATCH" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
