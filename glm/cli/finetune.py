"""The command line of `glm-finetune` / `python -m glm.finetune` and the settings of a fine-tuning run (no
torch: `--help` answers at once)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from glm.cli.common import ArgumentParser, add_model_arguments

DESCRIPTION = (
    "Fine-tune a checkpoint with LoRA or P-tuning v2 on a JSON-lines file of prompts and completions or "
    "on a task YAML's labelled data, the loss on the blank's tokens as generation fills them; or --merge "
    "a LoRA adapter into a checkpoint. Resumable: rerun the same command after a stop."
)
LORA_TARGETS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@dataclass
class FinetuneConfig:
    """What a run is; saved with its state, so a resumed run goes on with the same settings and data order."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attention.query_key_value", "attention.dense")
    prefix_length: int = 16
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_length: int = 512
    eval_every: int = 50
    save_every: int = 50
    eval_examples: int = 256

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FinetuneConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls(**{**values, "targets": tuple(values["targets"])})


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig
    p = ArgumentParser(prog="glm-finetune", description=DESCRIPTION)
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        help='training data: a .jsonl file of {"prompt": ..., "completion": ...} (the prompt may hold '
        "[MASK], [sMASK] or [gMASK]; none: [gMASK] is appended), or a task YAML of the evaluator's schema",
    )
    data.add_argument("--train-split", default="train", help="task YAML: the file_pattern group to train on")
    data.add_argument("--train-file", help="task YAML: train on this file of the task's items instead")
    data.add_argument(
        "--eval-data",
        help="held-out examples for the loss every --eval-every steps: a .jsonl of prompts, or with a task "
        "YAML a file of its items (default: none)",
    )
    data.add_argument("--data-path", default=".", help="task YAML: base folder of the task's `path`")
    data.add_argument(
        "--max-length", type=int, default=d.max_length, help="tokens per example (left-truncated)"
    )
    p.add_argument(
        "--method",
        choices=["lora", "ptuning"],
        default=d.method,
        help="lora: low-rank updates of the --targets; ptuning: P-tuning v2, trainable prefix keys and "
        "values in every layer (--prefix-length)",
    )
    p.add_argument(
        "--prefix-length", type=int, default=d.prefix_length, help="ptuning: prefix tokens per layer"
    )
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=d.rank)
    lora.add_argument("--alpha", type=float, default=d.alpha, help="the update is scaled by alpha / rank")
    lora.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the adapter's input")
    lora.add_argument(
        "--targets", nargs="+", choices=LORA_TARGETS, default=list(d.targets), help="linear layers adapted"
    )
    loop = p.add_argument_group("training")
    loop.add_argument("--output", help="run folder: adapter/, finetune_state.pt, log.jsonl")
    loop.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    loop.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    loop.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    loop.add_argument(
        "--lr", type=float, default=d.lr, help="peak learning rate (warm-up, then cosine to 10%%)"
    )
    loop.add_argument("--warmup", type=int, default=d.warmup)
    loop.add_argument("--weight-decay", type=float, default=d.weight_decay)
    loop.add_argument("--grad-clip", type=float, default=d.grad_clip)
    loop.add_argument("--seed", type=int, default=d.seed, help="adapter initialisation, data order, dropout")
    loop.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16, help="bf16 autocast")
    loop.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=d.gradient_checkpointing,
        help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)",
    )
    loop.add_argument("--eval-every", type=int, default=d.eval_every)
    loop.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out examples scored")
    loop.add_argument("--save-every", type=int, default=d.save_every, help="steps between saved states")
    loop.add_argument(
        "--stop-after", type=int, help="stop (and save) after this many steps of this invocation"
    )
    p.add_argument(
        "--merge",
        metavar="FOLDER",
        help="write --checkpoint with --adapter merged into its weights to FOLDER (the original layout), "
        "then exit",
    )
    p.add_argument(
        "--merge-dtype",
        choices=["same", "float32", "float16", "bfloat16"],
        default="same",
        help="dtype of the merged weights (same: the checkpoint's)",
    )
    add_model_arguments(p)
    return p
