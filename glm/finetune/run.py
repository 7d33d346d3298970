"""A fine-tuning run from the command line: check the data, load the base (any --dtype, quantization,
device; sharded under `torchrun --nproc-per-node N ... --tensor-parallel-size N`), build the examples, train
(glm.finetune.loop) and write the adapter to OUTPUT/adapter (rank 0 writes; every rank gathers)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from glm.adapters.files import base_identity, save_adapter
from glm.api import load_from_args
from glm.cli.finetune import FinetuneConfig
from glm.finetune.data import Example, prompt_example, read_prompts, task_examples, task_files
from glm.finetune.loop import adapter_options, train
from glm.finetune.state import STATE_FILE
from glm.model import GLM
from glm.tokenizer import GLMTokenizer


def is_task(path: str) -> bool:
    return Path(path).suffix in (".yaml", ".yml")


def examples_of(
    path: str, files: list[Path], model: GLM, tokenizer: GLMTokenizer, args: argparse.Namespace
) -> list[Example]:
    """The examples of a JSON-lines file, or of the given files of a task YAML."""
    if not is_task(args.data):
        return [prompt_example(p, tokenizer) for p in read_prompts(path)]
    return [e for f in files for e in task_examples(args.data, f, model, tokenizer, args.data_path)]


def saved_config(output: Path) -> FinetuneConfig | None:
    """The settings of the run saved in `output`, if any (a resumed run keeps them)."""
    if not (output / STATE_FILE).exists():
        return None
    values = json.loads(torch.load(output / STATE_FILE, weights_only=True)["config"])
    return FinetuneConfig(**{**values, "targets": tuple(values["targets"])})


def run(args: argparse.Namespace, cfg: FinetuneConfig) -> int:
    out = Path(args.output)
    cfg = saved_config(out) or cfg
    if args.adapter:
        raise ValueError("--adapter with training: a run trains a new adapter (merge one first with --merge)")
    adapter_options(cfg)  # a bad --rank or --prefix-length fails here, before the model loads
    for path in (args.data, args.eval_data):
        if path and not is_task(args.data):
            read_prompts(path)  # a bad line fails here, before the model loads
    model, tokenizer = load_from_args(args)
    torch.manual_seed(cfg.seed)
    train_files = []
    if is_task(args.data):
        train_files = [Path(args.train_file)] if args.train_file else None
        train_files = train_files or task_files(args.data, args.train_split, args.data_path)
    examples = examples_of(args.data, train_files, model, tokenizer, args)
    held_out = []
    if args.eval_data:
        held_out = examples_of(args.eval_data, [Path(args.eval_data)], model, tokenizer, args)
    examples = [e.truncated(cfg.max_length) for e in examples]
    held_out = [e.truncated(cfg.max_length) for e in held_out]
    identity = base_identity(args.checkpoint, model.config)
    ids = (tokenizer.sop_id, tokenizer.eop_id, tokenizer.pad_id)
    records = train(model, examples, cfg, out, ids, identity, held_out, args.stop_after)
    training = {**asdict(cfg), "targets": list(cfg.targets), "data": str(args.data)}
    folder = save_adapter(out / "adapter", model, identity, {"training": training})
    last = records[-1] if records else {}
    print(
        f"adapter written to {folder} (step {last.get('step')}, loss {last.get('loss')}, "
        f"eval loss {last.get('eval_loss')})"
    )
    return 0
