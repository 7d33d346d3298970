"""The command line of `python -m glm.train` and the settings of a training run (no torch: `--help`
answers at once)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DESCRIPTION = "Pre-train a GLM with GLM-130B's blank-infilling objective: resumable, deterministic by --seed."


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    max_text_tokens: int = 224  # window of text per sample; blocks add a few tokens
    row_length: int = 256  # samples are packed into rows of this length
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=formatter)
    p.add_argument("--data", nargs="+", required=True, help="folders holding train.txt and valid.txt")
    p.add_argument("--tokenizer", required=True, help="sentencepiece model")
    p.add_argument("--model-config", help="GLMConfig JSON (new runs)")
    p.add_argument("--output", required=True, help="run folder: train_state.pt and loss_log.jsonl")
    p.add_argument("--export", help="write the final fp16 model here in the project's checkpoint format")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this long")
    p.add_argument("--stop-after", type=int, help="stop (and save) after this many steps of this invocation")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=200)
    return p
