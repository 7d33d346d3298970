"""The fine-tuning loop: LoRA or P-tuning v2 (glm.adapters.methods) over a frozen (float or quantized) base,
the loss on the blank's tokens.

Deterministic by --seed and resumable: the examples are read in a seeded permutation per epoch, and
micro-batch g of the run takes examples [g * batch, (g + 1) * batch) of that endless order, so a resumed
run sees exactly the data it would have seen; dropout is seeded per step. The state (adapter, optimizer,
step, settings, base identity; glm.finetune.state) is written every --save-every steps, at the end and on
Ctrl-C, each time to a temporary file renamed into place.

Under tensor parallelism (torchrun) every rank runs this same loop on the same data, seeds and learning
rates: each computes the same gathered logits and loss, its backward pass gives its part of the gradient
(glm.tensor_parallel), the partial sums of whole tensors are summed and the clipping norm is global
(glm.finetune.gradients), and each rank steps its own part. Rank 0 alone prints, shows the progress bar
and writes the log and the state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from glm.adapters.lora import LoRAOptions
from glm.adapters.methods import method_named
from glm.adapters.prefix import PrefixOptions
from glm.cli.finetune import FinetuneConfig
from glm.distributed import current, is_main
from glm.finetune.data import Example
from glm.finetune.gradients import clip_gradients, sum_partial_gradients
from glm.finetune.state import (
    STATE_FILE,
    load_optimizer_state,
    read_state,
    save_state,
    whole_optimizer_state,
)
from glm.model import GLM
from glm.objective import IGNORE, collate


def lora_options(cfg: FinetuneConfig) -> LoRAOptions:
    return LoRAOptions(cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))


def adapter_options(cfg: FinetuneConfig) -> LoRAOptions | PrefixOptions:
    """The options of the run's --method."""
    return lora_options(cfg) if cfg.method == "lora" else PrefixOptions(cfg.prefix_length)


def enable_gradient_checkpointing(model: GLM) -> None:
    """Recompute every block's activations in the backward pass instead of keeping them."""
    for block in model.transformer.layers:
        plain = block.forward

        def forward(*inputs, _plain=plain):
            return checkpoint(_plain, *inputs, use_reentrant=False)

        block.forward = forward  # an instance attribute: module names (and state-dict keys) stay the same


def batch_of(examples: Sequence[Example], sop: int, eop: int, pad: int) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest (glm.objective.collate)."""
    return collate([[e.sample(sop, eop)] for e in examples], pad)


def micro_batch(examples: Sequence[Example], index: int, size: int, seed: int) -> list[Example]:
    """Micro-batch `index` of the run: `size` examples of the endless seeded order (see module doc)."""
    out = []
    for k in range(index * size, (index + 1) * size):
        epoch, i = divmod(k, len(examples))
        out.append(examples[_order(len(examples), seed, epoch)[i]])
    return out


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def loss_sum(model: GLM, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy over the labelled tokens, and their count."""
    device = model.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(
            batch["tokens"].to(device), batch["position_ids"].to(device), batch["attention_mask"].to(device)
        )
    labels = batch["labels"].to(device)
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def evaluate(
    model: GLM, examples: Sequence[Example], cfg: FinetuneConfig, ids: tuple[int, int, int]
) -> float:
    """Mean loss per labelled token over the held-out examples."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), cfg.batch_size):
        loss, n = loss_sum(model, batch_of(examples[start : start + cfg.batch_size], *ids), cfg.bf16)
        total, count = total + loss.item(), count + n
    model.train()
    return total / max(1, count)


def learning_rate(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: GLM,
    examples: Sequence[Example],
    cfg: FinetuneConfig,
    output: str | Path,
    ids: tuple[int, int, int],
    identity: str,
    eval_examples: Sequence[Example] = (),
    stop_after: int | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Fine-tune `model` in place (the adapter of --method is applied to it; a state in `output` is resumed)
    and return the log records of this invocation. `ids` is (sop, eop, pad)."""
    if not examples:
        raise ValueError("no training examples")
    method = method_named(cfg.method)
    options = adapter_options(cfg)  # checked before anything is written
    main, parallel = is_main(), current().tensor_parallel_size > 1
    quiet = quiet or not main
    out = Path(output)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = read_state(state_path)
    if state is not None and state["identity"] != identity:
        raise ValueError(
            f"{state_path} is a run over another base model ({state['identity']}, this one {identity}): "
            "use another --output, or the run's own --checkpoint"
        )
    method.apply(model, options, seed=cfg.seed, initialise=state is None)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        method.load_full_state_dict(model, state["adapter"])
        load_optimizer_state(optimizer, model, params, method, state["optimizer"])
        start = int(state["step"])
        if not quiet:
            print(f"resuming {out} at step {start}")

    def save(step: int) -> None:  # every rank gathers; rank 0 writes
        adapter = method.full_state_dict(model)
        moments = whole_optimizer_state(optimizer, model, params, method)
        record = {"adapter": adapter, "optimizer": moments, "step": step}
        save_state(state_path, {**record, "config": json.dumps(asdict(cfg)), "identity": identity})

    eval_examples = list(eval_examples)[: cfg.eval_examples]
    records: list[dict] = []
    model.train()
    progress = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="finetune", unit="step", disable=quiet
    )
    tokens_seen, began, step = 0, time.time(), start
    log_file = (out / "log.jsonl").open("a") if main else contextlib.nullcontext()
    with log_file as log:
        try:
            for step in progress:
                lr = learning_rate(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: the same resumed, on every rank
                batches = [
                    batch_of(micro_batch(examples, step * cfg.grad_accum + k, cfg.batch_size, cfg.seed), *ids)
                    for k in range(cfg.grad_accum)
                ]
                labelled = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
                total = 0.0
                for batch in batches:  # the mean over every labelled token of the step
                    loss, _ = loss_sum(model, batch, cfg.bf16)
                    (loss / labelled).backward()
                    total += loss.item()
                    tokens_seen += int((batch["tokens"] != ids[2]).sum())
                sum_partial_gradients(params)
                norm = float(clip_gradients(params, cfg.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                record = {"step": step + 1, "loss": round(total / labelled, 4), "lr": lr}
                record["grad_norm"] = float(f"{norm:.6g}")  # the whole adapter's, before clipping
                if eval_examples and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                    record["eval_loss"] = round(evaluate(model, eval_examples, cfg, ids), 4)
                record["tokens_per_s"] = round(tokens_seen / max(1e-9, time.time() - began), 1)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                records.append(record)
                progress.set_postfix(loss=record["loss"], tok_s=record["tokens_per_s"])
                if (step + 1) % cfg.save_every == 0:
                    save(step + 1)
                if stop_after and step + 1 - start >= stop_after:
                    step += 1
                    break
            else:
                step = cfg.steps
        except KeyboardInterrupt:
            if parallel:  # the ranks may be at different points: no collective can gather the state now
                if main:
                    print(
                        f"interrupted: {state_path} holds the last saved state; rerun the command to resume"
                    )
                raise
            done = len(records) + start
            save(done)
            print(
                f"interrupted: the state at step {done} is in {state_path}; rerun the same command to resume"
            )
            raise
    save(step)
    model.eval()
    return records
