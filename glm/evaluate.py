"""Evaluate a GLM model on tasks described by YAML configs: `python -m glm.evaluate --help`.

As the original `evaluate.py`: every task config is read and its class resolved before the model is
loaded; each task prints its per-file results and per-group max / median / average. Unlike the original,
the results are also written to `<output-dir>/evaluate-<time>.json` (and, with --save-predictions, one
line per sample to `<output-dir>/evaluate-<time>.predictions.jsonl`), and every config or data problem is
an error before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from glm.api import add_model_arguments, load_from_args, run_cli
from glm.evaluation.config import collect_task_files, load_task_config, resolve_file_groups
from glm.evaluation.report import ALL_DONE, TASK_LOADED, TASKS_LOADED
from glm.evaluation.tasks import BaseTask, TaskResult, task_class

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate",
        description="Evaluate a GLM model on YAML-configured tasks (multiple choice, generation, language "
        "modelling), in the original GLM-130B evaluator's format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("tasks", nargs="*", metavar="TASK", help="task YAML files or folders (recursive)")
    parser.add_argument(
        "--task", nargs="+", action="extend", default=[], help="more task YAML files or folders (recursive)"
    )
    parser.add_argument("--data-path", default=str(REPO_ROOT), help="base folder of every task's `path`")
    add_model_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir", default="logs", help="folder for evaluate-<time>.json (and .predictions.jsonl)"
    )
    out.add_argument("--save-predictions", action="store_true", help="also write every sample's prediction")
    out.add_argument(
        "--limit", type=int, help="only the first N items (LM: windows) of each file, for quick checks"
    )
    return parser


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    paths = [*args.tasks, *args.task]
    if not paths:
        raise ValueError("no task given: pass task YAML files or folders")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    data_root = Path(args.data_path)
    files = collect_task_files(paths)
    if not files:
        raise FileNotFoundError(f"no task YAML (*.yaml, *.yml) found in {', '.join(paths)}")

    # As the original: every config is read and its class resolved before the model is loaded; unlike it,
    # the data files are looked up now too.
    tasks: list[tuple[Path, Any, type[BaseTask]]] = []
    for file in files:
        config = load_task_config(file)
        cls = task_class(config)
        resolve_file_groups(config, data_root)
        tasks.append((file, config, cls))
        print(TASK_LOADED.format(name=config.name, path=file))
    print(TASKS_LOADED.format(count=len(tasks), s="s" if len(tasks) > 1 else ""))

    start = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model, tokenizer = load_from_args(args)
    results: list[TaskResult] = []
    with torch.inference_mode():
        for _, config, cls in tasks:
            task = cls(model, tokenizer, config, data_root, args.limit, args.save_predictions)
            results.append(task.evaluate())
    seconds = time.time() - start
    print(ALL_DONE.format(count=len(tasks), s="s" if len(tasks) > 1 else "", seconds=seconds))

    report = {
        "checkpoint": str(args.checkpoint),
        "data_path": str(data_root),
        "limit": args.limit,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "tasks": [r.to_json() | {"config_file": str(f)} for r, (f, _, _) in zip(results, tasks, strict=True)],
        "seconds": round(seconds, 3),
    }
    output = Path(args.output_dir) / f"evaluate-{stamp}.json"
    _write_atomic(output, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"Results written to {output}")
    if args.save_predictions:
        lines = [json.dumps(r, ensure_ascii=False) for result in results for r in result.predictions]
        predictions = output.with_suffix(".predictions.jsonl")
        _write_atomic(predictions, "".join(line + "\n" for line in lines))
        print(f"Predictions written to {predictions}")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, build_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
