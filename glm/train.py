"""Pre-train a GLM with GLM-130B's blank-infilling objective: `python -m glm.train --help`.

Resumable (the state is saved every --save-every steps and at the end) and deterministic given --seed:
step i's batch is drawn from a generator seeded with (seed, i), so a resumed run sees the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from glm.checkpoint import save_checkpoint
from glm.cli.train import TrainConfig, build_parser
from glm.config import GLMConfig
from glm.model import GLM, init_random_weights
from glm.objective import IGNORE, SpecialIds, collate, make_sample
from glm.tokenizer import GLMTokenizer


class TokenStream:
    """The documents of a corpus file (paragraphs one per line, a blank line between documents) as token ids,
    paragraphs joined by a newline. A training window starts at a random paragraph (chosen in proportion to
    length) and runs to the end of its document or max_tokens; it is whole if it reaches the document's end.
    """

    def __init__(
        self, ids: torch.Tensor, paragraph_starts: torch.Tensor, document_ends: torch.Tensor
    ) -> None:
        self.ids = ids  # [n] int32, all documents back to back
        self.paragraph_starts = paragraph_starts  # [p] start of each paragraph
        self.document_ends = document_ends  # [p] end of each paragraph's document

    @classmethod
    def from_file(cls, path: Path, tokenizer: GLMTokenizer) -> TokenStream:
        documents = [d.strip("\n") for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        newline = tokenizer.sp.piece_to_id("\n") + tokenizer.text_offset
        ids: list[int] = []
        starts, ends = [], []
        for encoded in tokenizer.sp.encode(documents):
            document = [t + tokenizer.text_offset for t in encoded]
            starts += [len(ids)] + [len(ids) + i + 1 for i, t in enumerate(document[:-1]) if t == newline]
            ids += document
            ends += [len(ids)] * (len(starts) - len(ends))
        return cls(torch.tensor(ids, dtype=torch.int32), torch.tensor(starts), torch.tensor(ends))

    def window(self, max_tokens: int, generator: torch.Generator) -> tuple[list[int], bool]:
        position = int(torch.randint(0, len(self.ids), (1,), generator=generator))
        paragraph = int(torch.searchsorted(self.paragraph_starts, position, right=True)) - 1
        start, end = int(self.paragraph_starts[paragraph]), int(self.document_ends[paragraph])
        stop = min(end, start + max_tokens)
        return self.ids[start:stop].tolist(), stop == end


def special_ids(tokenizer: GLMTokenizer) -> SpecialIds:
    c = tokenizer.get_command
    return SpecialIds(c("[MASK]"), c("[gMASK]"), c("sop"), c("eop"), c("eos"), tokenizer.pad_id)


def batch_for_step(
    streams: list[TokenStream], weights: torch.Tensor, step: int, cfg: TrainConfig, ids: SpecialIds
):
    """batch_size rows of row_length tokens, packed with samples (padding only at row ends)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows: list[list] = [[]]
    used = 0
    while True:
        stream = streams[int(torch.multinomial(weights, 1, generator=generator))]
        text, complete = stream.window(cfg.max_text_tokens, generator)
        sample = make_sample(text, complete, ids, generator)
        if len(sample.tokens) > cfg.row_length:  # many one-token spans can outgrow a row: draw again
            continue
        if used + len(sample.tokens) > cfg.row_length:
            if len(rows) == cfg.batch_size:
                return collate(rows, ids.pad, cfg.row_length)
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += len(sample.tokens)


def loss_of(model: GLM, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: GLM, streams, weights, cfg: TrainConfig, ids: SpecialIds, batches: int = 8) -> float:
    """Mean objective loss over fixed validation batches (seeded apart from training)."""
    model.eval()
    eval_cfg = TrainConfig(**{**asdict(cfg), "seed": cfg.seed + 7919})
    losses = [
        loss_of(model, batch_for_step(streams, weights, i, eval_cfg, ids), cfg.bf16).item()
        for i in range(batches)
    ]
    model.train()
    return sum(losses) / len(losses)


def main(args: argparse.Namespace) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = GLMTokenizer.sentencepiece(args.tokenizer)
    ids = special_ids(tokenizer)
    torch.manual_seed(args.seed)
    state_path = out / "train_state.pt"
    if state_path.exists():  # resume: the run's own configs win over the command line
        state = torch.load(state_path, weights_only=True)
        model_config = GLMConfig.from_dict(json.loads(state["model_config"]))
        cfg = TrainConfig(**json.loads(state["train_config"]))
        print(f"resuming {out} at step {int(state['step'])}")
    else:
        state = None
        model_config = GLMConfig.from_file(args.model_config)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            seed=args.seed,
            bf16=args.bf16,
        )
    if tokenizer.vocab_size > model_config.vocab_size:
        raise SystemExit(
            f"error: the tokenizer has {tokenizer.vocab_size} ids, the model {model_config.vocab_size}"
        )

    def streams_of(split: str) -> list[TokenStream]:
        return [TokenStream.from_file(Path(p) / f"{split}.txt", tokenizer) for p in args.data]

    train, valid = streams_of("train"), streams_of("valid")
    # Sample languages/sources in proportion to the square root of their size: a balanced mix.
    weights = torch.tensor([len(s.ids) ** 0.5 for s in train], dtype=torch.float)
    model = init_random_weights(GLM(model_config), seed=cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])

    def save(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "model_config": json.dumps(model_config.to_dict()),
                "train_config": json.dumps(asdict(cfg)),
            },
            tmp,
        )
        os.replace(tmp, state_path)

    log = (out / "loss_log.jsonl").open("a")
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", unit="step")
    tokens_seen, began = 0, time.time()
    step = start
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = batch_for_step(train, weights, step, cfg, ids)
        loss = loss_of(model, batch, cfg.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int((batch["tokens"] != ids.pad).sum())
        record = {"step": step + 1, "loss": round(loss.item(), 4), "lr": group["lr"]}
        if (step + 1) % args.eval_every == 0 or step + 1 == cfg.steps:
            record["valid_loss"] = round(evaluate(model, valid, weights, cfg, ids), 4)
        record["tokens_per_s"] = round(tokens_seen / (time.time() - began), 1)
        log.write(json.dumps(record) + "\n")
        log.flush()
        progress.set_postfix(loss=record["loss"], tok_s=record["tokens_per_s"])
        if (step + 1) % args.save_every == 0:
            save(step + 1)
        if deadline and time.time() > deadline:
            print(f"stopping at step {step + 1}: --max-minutes reached")
            break
        if args.stop_after and step + 1 - start >= args.stop_after:
            break
    save(step + 1)
    if args.export:
        export = save_checkpoint(
            {k: v.half() for k, v in model.state_dict().items()},
            args.export,
            model_config,
            tokenizer,
            overwrite=True,
        )
        print(f"exported fp16 weights to {export}")


if __name__ == "__main__":
    main(build_parser().parse_args())
