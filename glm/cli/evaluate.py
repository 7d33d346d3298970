"""The command line of `glm-evaluate` / `scripts/evaluate.sh` (no torch: `--help` answers at once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from glm.cli.common import ArgumentParser, add_model_arguments

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="evaluate",
        description="Evaluate a GLM model on YAML-configured tasks (multiple choice, generation, language "
        "modelling), in the original GLM-130B evaluator's format.",
    )
    parser.add_argument(
        "tasks",
        nargs="*",
        metavar="TASK",
        help="task YAML files or folders (recursive) (default: none; give TASK or --task)",
    )
    parser.add_argument(
        "--task", nargs="+", action="extend", default=[], help="more task YAML files or folders (recursive)"
    )
    parser.add_argument("--data-path", default=str(REPO_ROOT), help="base folder of every task's `path`")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="samples per forward pass for every task (default: each config's micro_batch_size)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--data-parallel-size",
        type=int,
        help="model replicas the samples are spread over (torchrun / deepspeed) "
        "(default: the world size / the tensor-parallel size)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir", default="logs", help="folder for evaluate-<time>.json (and .predictions.jsonl)"
    )
    out.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write every sample's input, choices (with scores) or targets, and prediction",
    )
    out.add_argument(
        "--limit",
        type=int,
        help="only the first N items (LM: windows) of each file, for quick checks (default: all)",
    )
    return parser
