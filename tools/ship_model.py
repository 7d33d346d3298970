"""Ship a trained model as the bundled default: copy the exported checkpoint, record checksums, the
training summary and the greedy infills the tests check.

    python tools/ship_model.py --export runs/export --run runs/bilingual --output models/glm-bilingual
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from glm.api import load
from glm.decoding.infill import fill_blanks
from glm.decoding.options import GenerationOptions

# The fixed prompts whose greedy infills tests/test_bundled_model.py checks.
GREEDY_PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a [MASK].",
    "The President said that the [MASK] of the United States is strong.",
    "And God said, Let there be light: and there was",
    "选择「文件 - 打印」，然后单击[MASK]。",
    "春眠不觉晓，[MASK]。",
    "白日依山尽，",
]
GREEDY = GenerationOptions(top_k=1, top_p=0.0, out_seq_length=64)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    return {str(p.relative_to(folder)): sha256(p) for p in files}


def greedy_infills(folder: Path) -> dict[str, str]:
    model, tokenizer = load(folder)
    answers = fill_blanks(model, tokenizer, GREEDY_PROMPTS, GREEDY)
    return {prompt: a.text(tokenizer) for prompt, (a,) in zip(GREEDY_PROMPTS, answers, strict=True)}


def training_summary(run: Path) -> dict:
    log = [json.loads(line) for line in (run / "loss_log.jsonl").read_text().splitlines() if line.strip()]
    state = torch.load(run / "train_state.pt", weights_only=True)
    train_config = json.loads(state["train_config"])
    valid = [r for r in log if "valid_loss" in r]
    return {
        "steps": log[-1]["step"],
        "train_config": train_config,
        "tokens_per_step": train_config["batch_size"] * train_config["row_length"],
        "mean_tokens_per_s": log[-1]["tokens_per_s"],
        "final_train_loss_50_step_mean": round(sum(r["loss"] for r in log[-50:]) / len(log[-50:]), 4),
        "final_valid_loss": valid[-1]["valid_loss"] if valid else None,
    }


def main(export: Path, run: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(export, output)
    (output / "training.json").write_text(
        json.dumps(training_summary(run), indent=1, ensure_ascii=False) + "\n"
    )
    (output / "greedy_infills.json").write_text(
        json.dumps(greedy_infills(output), indent=1, ensure_ascii=False) + "\n"
    )
    sums = checksums(output)
    (output / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    print(f"shipped {output}: {len(sums)} files")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", type=Path, default=Path("runs/export"))
    parser.add_argument("--run", type=Path, default=Path("runs/bilingual"))
    parser.add_argument("--output", type=Path, default=Path("models/glm-bilingual"))
    args = parser.parse_args()
    main(args.export, args.run, args.output)
