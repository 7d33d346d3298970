"""Peak memory and bytes read while loading a checkpoint: `python -m bench.load_memory --help`.

Each load runs in a fresh process after the checkpoint's files are evicted from the page cache
(posix_fadvise DONTNEED), and reports:
- peak RSS above the process's RSS just before the load (VmHWM - VmRSS before, from /proc/self/status),
- bytes read from disk during the load (/proc/self/io read_bytes; memory-mapped pages faulted in count),
- the loaded model's bytes and its largest tensor, and the goal: model + largest tensor + 10 %.
`--baseline-tree DIR` runs the same loads with another checkout's `glm` (e.g. a `git worktree` of an older
commit), in the same run, for before/after tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent

# Memory and I/O counters of the child process; the load scripts of bench/ start from these.
CHILD_PRELUDE = """
import json, sys, torch
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def read_bytes():
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

"""

_CHILD = (
    CHILD_PRELUDE
    + """
from glm.config import get_preset
from glm.loading import load_model
from glm.model import GLM
with torch.device("meta"):  # torch's one-time set-up (~70 MB) is not the load's
    GLM(get_preset("sat-tiny"))
folder, dtype = sys.argv[1], sys.argv[2]
rss, io = status("VmRSS"), read_bytes()
model, _ = load_model(folder, dtype=dtype)
peak, io_after = status("VmHWM"), read_bytes()
tensors = list(model.parameters())
print(json.dumps({
    "peak_above_start": peak - rss,
    "rss_after_above_start": status("VmRSS") - rss,
    "read_bytes": io_after - io,
    "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
    "largest_tensor": max(t.numel() * t.element_size() for t in tensors),
}))
"""
)


def evict(folder: Path) -> None:
    for path in folder.rglob("*.pt"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(code: str, args: list[str], failure: str, tree: Path = ROOT) -> dict:
    """Run a load script in a fresh interpreter with `tree` first on its path; its last line, as JSON.
    `failure` starts the error raised if it fails."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
    )
    if out.returncode:
        raise RuntimeError(f"{failure}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(folder: Path, dtype: str, tree: Path = ROOT) -> dict:
    evict(folder)
    result = run_child(_CHILD, [str(folder.resolve()), dtype], f"loading {folder} with {tree} failed", tree)
    result["goal"] = int(1.1 * (result["model_bytes"] + result["largest_tensor"]))
    return result


def make_checkpoint(preset: str, shards: int, folder: Path) -> Path:
    """A checkpoint of `preset` with random weights, fp16 on disk, in `shards` rank files."""
    import torch

    from glm.checkpoint import save_checkpoint
    from glm.config import get_preset
    from glm.model import GLM, init_random_weights

    config = get_preset(preset)
    with torch.device("meta"):
        model = GLM(config)
    model = init_random_weights(model.to(torch.float16).to_empty(device="cpu"))
    return save_checkpoint(model.state_dict(), folder, config, None, shards)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", action="append", type=Path, default=[], help="existing checkpoint")
    parser.add_argument("--preset", default="glm-600m", help="random-weight model to write (fp16 on disk)")
    parser.add_argument("--shards", type=int, nargs="*", default=[1, 4], help="shard counts for --preset")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to measure in the same run")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = [(str(c), c) for c in args.checkpoint]
        for shards in args.shards if args.preset else []:
            folder = make_checkpoint(args.preset, shards, Path(tmp) / f"{args.preset}-tp{shards}")
            folders.append((f"{args.preset} fp16, {shards} shard(s)", folder))
        trees = [("this tree", ROOT)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
        for name, folder in folders:
            for dtype in args.dtypes:
                for tree_name, tree in trees:
                    row = {
                        "checkpoint": name,
                        "dtype": dtype,
                        "tree": tree_name,
                        **measure(folder, dtype, tree),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    mib = 2**20
    print(f"\nCPU: {cpu_name()}\n")
    print("| checkpoint | in memory | code | peak RSS MiB | goal MiB | read MiB | model MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['dtype']} | {r['tree']} | {r['peak_above_start'] / mib:.0f} | "
            f"{r['goal'] / mib:.0f} | {r['read_bytes'] / mib:.0f} | {r['model_bytes'] / mib:.0f} |"
        )
    if args.output:
        args.output.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
