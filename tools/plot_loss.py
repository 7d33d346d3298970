"""Plot a training run's loss log (loss_log.jsonl from glm/train.py) to a PNG. Needs matplotlib.

python tools/plot_loss.py runs/bilingual/loss_log.jsonl models/glm-bilingual/loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(log: Path, output: Path, smooth: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    smoothed = [
        sum(losses[max(0, i - smooth + 1) : i + 1]) / len(losses[max(0, i - smooth + 1) : i + 1])
        for i in range(len(losses))
    ]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#bbb", linewidth=0.6, label="train (per step)")
    ax.plot(steps, smoothed, color="#1f77b4", label=f"train ({smooth}-step mean)")
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", color="#d62728", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("blank-infilling loss (nats/token)")
    ax.set_title("GLM pre-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--smooth", type=int, default=50, help="steps in the running mean")
    args = parser.parse_args()
    main(args.log, args.output, args.smooth)
