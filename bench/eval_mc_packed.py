"""Multiple-choice scoring speed on zh_idiom_cloze: the packed row (context once) against one row per choice.

    python -m bench.eval_mc_packed --items 200 --before-tree /tmp/before --json OUT.json

1. **Layouts, in one process** on the same samples and model: `glm.scoring.score_rows` with one packed row
   per item (the original's layout), then with one row per choice (the old layout: the context repeated
   for every choice), micro-batches of `--micro-batch-size` items, alternating `--repeats` times.
2. **End to end**: `bash scripts/evaluate.sh tasks/offline/zh_idiom_cloze.yaml --limit N` in this tree and,
   with `--before-tree`, in a copy of the tree before the change (`git archive <commit> | tar -x -C DIR`),
   alternating; items/s from the task's own `Finish task ... in Xs.` line.

`other-cores` is how many cores other processes kept busy meanwhile (bench/benchmark.py); numbers taken
with other-cores well above 0 on a 2-core machine are slowed by the other load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.benchmark import cpu_snapshot, other_cores
from bench.machine import cpu_name
from glm.api import load
from glm.evaluation.dataset import multiple_choice_samples, read_jsonl
from glm.scoring import choice_row, score_rows

REPO = Path(__file__).resolve().parent.parent
TASK = "tasks/offline/zh_idiom_cloze.yaml"
DATA = REPO / "tasks/offline/zh_idiom_cloze/test.jsonl"


def time_layouts(items: int, micro_batch: int, repeats: int) -> dict:
    model, tokenizer = load()
    model.eval()
    data = read_jsonl(DATA)[:items]
    samples = multiple_choice_samples(data, tokenizer, 1024, False, encode=tokenizer.tokenize_with_masks)
    packed = [s.row for s in samples]
    per_choice = [
        [choice_row(s.context, [c], s.mask_position, sop_id=tokenizer.sop_id) for c in s.choices]
        for s in samples
    ]
    layouts = {
        "packed": [packed[i : i + micro_batch] for i in range(0, items, micro_batch)],
        "per-choice": [
            [r for rows in per_choice[i : i + micro_batch] for r in rows]
            for i in range(0, items, micro_batch)
        ],
    }
    result = {
        name: {"positions": sum(len(r.tokens) for b in batches for r in b), "seconds": [], "other_cores": []}
        for name, batches in layouts.items()
    }
    with torch.inference_mode():
        for batches in layouts.values():  # warm-up
            score_rows(model, batches[0])
        for _ in range(repeats):
            for name, batches in layouts.items():
                before, start = cpu_snapshot(), time.perf_counter()
                for batch in batches:
                    score_rows(model, batch)
                result[name]["seconds"].append(time.perf_counter() - start)
                result[name]["other_cores"].append(other_cores(before, cpu_snapshot()))
    for entry in result.values():
        entry["items_per_s"] = items / statistics.median(entry["seconds"])
    return result


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_evaluator(tree: Path, items: int) -> dict:
    logs = Path("/tmp") / f"eval-mc-bench-{os.getpid()}"
    command = ["bash", "scripts/evaluate.sh", TASK, "--limit", str(items), "--output-dir", str(logs)]
    before, child, start = cpu_snapshot(), children_cpu(), time.perf_counter()
    out = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    busy = cpu_snapshot()[0] - before[0]
    others = max(busy - (children_cpu() - child), 0.0) / wall
    seconds = float(re.search(r"Finish task zh_idiom_cloze in ([0-9.]+)s\.", out).group(1))
    accuracy = float(re.search(r"Finish test\.jsonl, Accuracy = ([0-9.]+)", out).group(1))
    return {
        "task_seconds": seconds,
        "items_per_s": items / seconds,
        "accuracy": accuracy,
        "other_cores": others,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200, help="first N items of zh_idiom_cloze")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before-tree", type=Path, help="a copy of the tree before the change")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    report: dict = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "items": args.items,
        "micro_batch_size": args.micro_batch_size,
        "layouts": time_layouts(args.items, args.micro_batch_size, args.repeats),
    }
    for name, entry in report["layouts"].items():
        print(
            f"{name:>10}: {entry['items_per_s']:.2f} items/s, {entry['positions']} token positions, "
            f"other-cores max {max(entry['other_cores']):.2f}"
        )
    trees = {"after": REPO} | ({"before": args.before_tree} if args.before_tree else {})
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.repeats if args.before_tree else 1):
        for name, tree in trees.items():
            runs[name].append(run_evaluator(tree, args.items))
            print(f"evaluate.sh {name:>6}: {runs[name][-1]}")
    report["evaluator"] = {
        name: {"items_per_s_median": statistics.median(r["items_per_s"] for r in entries), "runs": entries}
        for name, entries in runs.items()
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
