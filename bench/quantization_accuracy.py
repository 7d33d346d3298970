"""Accuracy of the bundled model at fp32 / INT8 / INT4 per row / INT4 group-wise on the offline tasks.

    python -m bench.quantization_accuracy --output bench/results/quant-accuracy.json

Runs the evaluator (glm.evaluate's check_tasks and task classes, the same code as `scripts/evaluate.sh`)
on tasks/offline (en_lm / zh_lm perplexity, multiple-choice accuracy) once per precision, the model loaded
through the quantize transform (float weights quantized while loading).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import cpu_name
from glm.api import DEFAULT_MODEL, load
from glm.evaluate import REPO_ROOT, check_tasks
from glm.quantize import quantization_transform

SETTINGS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "INT8": dict(bits=8),
    "INT4 per row": dict(bits=4),
    "INT4 group 128": dict(bits=4, scheme="group", group_size=128),
    "INT4 group 32": dict(bits=4, scheme="group", group_size=32),
}


def evaluate(settings: dict[str, Any] | None, tasks, limit: int | None) -> dict[str, dict[str, Any]]:
    transforms = [quantization_transform(**settings)] if settings else []
    model, tokenizer = load(DEFAULT_MODEL, transforms=transforms)
    metrics: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for _, config, cls in tasks:
            result = cls(model, tokenizer, config, REPO_ROOT, limit, False).evaluate().to_json()
            for group in result["groups"].values():
                metrics[result["name"]] = group["stats"]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=[str(REPO_ROOT / "tasks" / "offline")])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--limit", type=int, help="first N items per file (quick checks)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    tasks = check_tasks(args.tasks, REPO_ROOT, None)
    rows: dict[str, Any] = {}
    for name in args.settings:
        start = time.time()
        rows[name] = evaluate(SETTINGS[name], tasks, args.limit)
        print(name, f"{time.time() - start:.0f} s", json.dumps(rows[name]), flush=True)
    columns = sorted({(task, metric) for r in rows.values() for task, m in r.items() for metric in m})
    print(f"\nCPU: {cpu_name()}; model {DEFAULT_MODEL.name}; tasks {', '.join(args.tasks)}\n")
    print("| precision | " + " | ".join(f"{t} {m}" for t, m in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, r in rows.items():
        cells = [r.get(t, {}).get(m, {}).get("average") for t, m in columns]  # one file per task
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    if args.output:
        payload = {"cpu": cpu_name(), "model": str(DEFAULT_MODEL), "tasks": args.tasks, "results": rows}
        args.output.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
