"""Peak memory of each tensor-parallel rank while it loads its shard: `python -m bench.tp_load_memory --help`.

Every rank of TP = N loads in a fresh process of its own, after the checkpoint's files are evicted from the
page cache, exactly as under torchrun: the meta model is sharded by glm.tensor_parallel and the loader reads
only this rank's slices from the memory-mapped source files (the load itself communicates nothing, so the
ranks are run one after another here and do not disturb each other's numbers). Reported per rank:
- peak RSS above the process's RSS just before the load (VmHWM - VmRSS, /proc/self/status),
- bytes read from disk during the load (/proc/self/io read_bytes),
- the rank's shard (its parameters' bytes), and the goal: peak <= shard + 15 %.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.load_memory import CHILD_PRELUDE, evict, make_checkpoint, run_child
from bench.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent

_CHILD = (
    CHILD_PRELUDE
    + """
from glm import tensor_parallel
from glm.config import get_preset
from glm.distributed import Parallel
from glm.loading import load_model
from glm.model import GLM
with torch.device("meta"):  # torch's one-time set-up is not the load's
    tensor_parallel.apply_tensor_parallel(GLM(get_preset("sat-tiny")), 0, 2)
folder, dtype, rank, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
shard = tensor_parallel.transform(Parallel(rank=rank, world_size=size, tensor_parallel_size=size))
rss, io = status("VmRSS"), read_bytes()
model, _ = load_model(folder, dtype=dtype, transforms=[shard])
peak, io_after = status("VmHWM"), read_bytes()
tensors = list(model.parameters())
print(json.dumps({
    "peak_above_start": peak - rss,
    "rss_after_above_start": status("VmRSS") - rss,
    "read_bytes": io_after - io,
    "shard_bytes": sum(t.numel() * t.element_size() for t in tensors),
}))
"""
)


def measure(folder: Path, dtype: str, rank: int, size: int) -> dict:
    evict(folder)
    args = [str(folder.resolve()), dtype, str(rank), str(size)]
    result = run_child(_CHILD, args, f"rank {rank} of {size} failed to load {folder}")
    result["goal"] = int(1.15 * result["shard_bytes"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint (default: write --preset)")
    parser.add_argument("--preset", default="glm-600m", help="random-weight model to write, fp16 on disk")
    parser.add_argument("--source-shards", type=int, default=1, help="rank files of the written checkpoint")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="tensor-parallel sizes")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        folder = args.checkpoint or make_checkpoint(
            args.preset, args.source_shards, Path(tmp) / f"{args.preset}-tp{args.source_shards}"
        )
        name = (
            str(args.checkpoint) if args.checkpoint else f"{args.preset} fp16, {args.source_shards} file(s)"
        )
        for size in args.sizes:
            for dtype in args.dtypes:
                for rank in range(size):
                    row = {"checkpoint": name, "dtype": dtype, "tp": size, "rank": rank}
                    row |= measure(folder, dtype, rank, size)
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    mib = 2**20
    print(f"\nCPU: {cpu_name()}\n")
    print("| checkpoint | in memory | TP | rank | peak RSS MiB | shard MiB | peak / shard | read MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['dtype']} | {r['tp']} | {r['rank']} | "
            f"{r['peak_above_start'] / mib:.0f} | {r['shard_bytes'] / mib:.0f} | "
            f"{r['peak_above_start'] / r['shard_bytes']:.2f} | "
            f"{r['read_bytes'] / mib:.0f} |"
        )
    if args.output:
        args.output.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
