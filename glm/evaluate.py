"""Evaluate a GLM model on tasks described by YAML configs: `python -m glm.evaluate --help`.

As the original `evaluate.py`: every task config is read and its class resolved before the model is
loaded; each task prints its per-file results and per-group max / median / average. Unlike the original:

* every data file is read and checked before the model is loaded (malformed lines, items without
  choices, labels out of range), and two configs with the same task name are an error;
* results go to `<output-dir>/evaluate-<time>.json`, rewritten after every task with `"complete": false`
  until the last one finishes, so Ctrl-C or a crash keeps the finished tasks (`"status"` says which);
  the file records the project version, git commit, torch version, device, dtype, start and end times and
  the command line. `--save-predictions` writes `evaluate-<time>.predictions.jsonl` the same way: per sample
  the input, the choices (every choice's score) or targets, and the prediction;
* progress goes to stderr: a bar on a terminal, a line per 10 % and per file otherwise (log files).

Building the parser imports no torch (`--help` and flag errors answer at once); torch and the task classes
load after parsing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glm.api import load_from_args, run_cli
from glm.cli.evaluate import build_parser
from glm.evaluation.config import ConfigError, collect_task_files, load_task_config, resolve_file_groups
from glm.evaluation.report import ALL_DONE, TASK_LOADED, TASKS_LOADED
from glm.files import write_text_atomic

if TYPE_CHECKING:
    from glm.evaluation.tasks import BaseTask, TaskResult

REPO_ROOT = Path(__file__).resolve().parent.parent


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def run_info(argv: list[str]) -> dict[str, Any]:
    """What produced a results file: versions, commit, command line."""
    import torch

    try:
        version = importlib.metadata.version("glm130b-py")
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "project_version": version,
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "command_line": shlex.join(["python", "-m", "glm.evaluate", *argv]),
    }


def check_tasks(
    paths: list[str], data_root: Path, micro_batch_size: int | None
) -> list[tuple[Path, Any, type[BaseTask]]]:
    """Every config read, its class resolved and every data file checked, before any model is loaded."""
    from glm.evaluation.tasks import task_class  # torch

    files = collect_task_files(paths)
    if not files:
        raise FileNotFoundError(f"no task YAML (*.yaml, *.yml) found in {', '.join(paths)}")
    tasks: list[tuple[Path, Any, type[BaseTask]]] = []
    names: dict[str, Path] = {}
    for file in files:
        config = load_task_config(file)
        if config.name in names:
            raise ConfigError(
                f"{file}: task name '{config.name}' is already used by {names[config.name]}; give each task "
                "its own name"
            )
        names[config.name] = file
        if micro_batch_size is not None:
            config.micro_batch_size = micro_batch_size
        cls = task_class(config)
        for group in resolve_file_groups(config, data_root).values():
            for data_file in group:
                cls.check_file(config, data_file)
        tasks.append((file, config, cls))
        print(TASK_LOADED.format(name=config.name, path=file))
    print(TASKS_LOADED.format(count=len(tasks), s="s" if len(tasks) > 1 else ""))
    return tasks


def main(args: argparse.Namespace) -> int:
    import torch

    from glm.distributed import is_main

    paths = [*args.tasks, *args.task]
    if not paths:
        raise ValueError("no task given: pass task YAML files or folders")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be at least 1, got {args.micro_batch_size}")
    data_root = Path(args.data_path)
    tasks = check_tasks(paths, data_root, args.micro_batch_size)

    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder; pass a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output-dir {output_dir}: cannot create it ({error.strerror})") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {output_dir} is not writable; pass a folder you can write to")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = output_dir / f"evaluate-{stamp}.json"
    predictions_file = output.with_suffix(".predictions.jsonl")

    started, start = _now(), time.time()
    model, tokenizer = load_from_args(args)
    report: dict[str, Any] = {
        "complete": False,
        "status": "running",
        **run_info(getattr(args, "argv", sys.argv[1:])),
        "checkpoint": str(args.checkpoint),
        "data_path": str(data_root),
        "limit": args.limit,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "start_time": started,
        "end_time": None,
        "seconds": None,
        "tasks_planned": [config.name for _, config, _ in tasks],
        "tasks": [],
    }
    results: list[TaskResult] = []

    def save(status: str) -> None:
        if not is_main():  # every rank holds the results; rank 0 of a job writes them
            return
        report["status"], report["complete"] = status, status == "complete"
        report["end_time"], report["seconds"] = _now(), round(time.time() - start, 3)
        report["tasks"] = [
            r.to_json() | {"config_file": str(f)} for r, (f, _, _) in zip(results, tasks, strict=False)
        ]
        write_text_atomic(output, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        if args.save_predictions:
            lines = [json.dumps(p, ensure_ascii=False) + "\n" for r in results for p in r.predictions]
            write_text_atomic(predictions_file, "".join(lines))

    save("running")
    print(f"Results are written to {output} after every task", file=sys.stderr)
    try:
        with torch.inference_mode():
            for _, config, cls in tasks:
                task = cls(model, tokenizer, config, data_root, args.limit, args.save_predictions)
                results.append(task.evaluate())
                save("running")
    except KeyboardInterrupt:
        save("interrupted")
        print(
            f"interrupted: {len(results)} of {len(tasks)} tasks finished; their results are in {output}",
            file=sys.stderr,
        )
        return 130
    except BaseException:
        save("failed")
        print(
            f"{len(results)} of {len(tasks)} tasks finished; their results are in {output}", file=sys.stderr
        )
        raise
    save("complete")
    print(ALL_DONE.format(count=len(tasks), s="s" if len(tasks) > 1 else "", seconds=time.time() - start))
    print(f"Results written to {output}")
    if args.save_predictions:
        print(f"Predictions written to {predictions_file}")
    return 0


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
    run_cli(main, args)


if __name__ == "__main__":
    cli()
