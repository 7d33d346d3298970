"""`glm-finetune` / `python -m glm.finetune`: LoRA or P-tuning v2 fine-tuning of a checkpoint
(glm.finetune.loop) on a JSON-lines file of prompts and completions or a task YAML's data
(glm.finetune.data), and `--merge` of a LoRA adapter into a checkpoint (glm.finetune.merge). `--help`
answers before torch loads."""

from __future__ import annotations

import argparse
import sys

from glm.api import run_cli
from glm.cli.finetune import FinetuneConfig, build_parser


def main(args: argparse.Namespace) -> int:
    if args.merge:
        from glm.finetune.merge import merge_main

        return merge_main(args)
    from glm.finetune.run import run

    return run(args, FinetuneConfig.from_args(args))


def cli(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.merge and (not args.data or not args.output):
        print(
            "error: give --data and --output to fine-tune, or --merge FOLDER --adapter A (see --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.merge and not args.adapter:
        print("error: --merge FOLDER needs --adapter (the adapter folder to merge)", file=sys.stderr)
        sys.exit(2)
    run_cli(main, args)
