"""Peak memory of quantize-while-loading: `python -m bench.quantization_memory --help`.

Writes a glm-600m checkpoint with random weights (fp16 on disk, as GLM-130B's), then loads it in a fresh
process per setting with the quantize transform, after evicting its files from the page cache. Reports the
peak RSS above the process's RSS just before the load (VmHWM - VmRSS, /proc/self/status) against the
loaded model's bytes (quantized blocks, fp32 embeddings, LayerNorms and biases). Goal (issue 9): peak
<= 1.25 x the quantized model's bytes above the interpreter's baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.load_memory import CHILD_PRELUDE, evict, make_checkpoint, run_child
from bench.machine import cpu_name

_CHILD = (
    CHILD_PRELUDE
    + """
from glm.config import get_preset
from glm.loading import load_model
from glm.model import GLM
from glm.quantize import quantization_transform
with torch.device("meta"):  # torch's one-time set-up is not the load's
    GLM(get_preset("sat-tiny"))
folder, settings = sys.argv[1], json.loads(sys.argv[2])
transforms = [quantization_transform(**settings)] if settings else []
rss = status("VmRSS")
model, _ = load_model(folder, transforms=transforms)
peak = status("VmHWM")
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
print(json.dumps({
    "baseline_rss": rss,
    "peak_above_start": peak - rss,
    "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    "largest_tensor": max(t.numel() * t.element_size() for t in tensors.values()),
}))
"""
)

SETTINGS = {
    "fp32 (no quantization)": {},
    "int8": {"bits": 8},
    "int4": {"bits": 4},
    "int4 group 128": {"bits": 4, "scheme": "group", "group_size": 128},
}


def measure(folder: Path, settings: dict) -> dict:
    evict(folder)
    return run_child(_CHILD, [str(folder.resolve()), json.dumps(settings)], f"loading {folder} failed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="glm-600m")
    parser.add_argument("--shards", type=int, default=1, help="rank files of the written checkpoint")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(args.preset, args.shards, Path(tmp) / args.preset)
        for name, settings in SETTINGS.items():
            row = {"setting": name, **measure(folder, settings)}
            row["ratio"] = row["peak_above_start"] / row["model_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    mib = 2**20
    print(
        f"\nCPU: {cpu_name()}; {args.preset}, fp16 on disk, {args.shards} shard(s), "
        "loaded as fp32 + quantized\n"
    )
    print("| loaded as | peak RSS above start MiB | model MiB | peak / model | goal <= 1.25 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['peak_above_start'] / mib:.0f} | {r['model_bytes'] / mib:.0f} | "
            f"{r['ratio']:.2f} | {'yes' if r['ratio'] <= 1.25 else 'no'} |"
        )
    if args.output:
        args.output.write_text(
            json.dumps({"cpu": cpu_name(), "preset": args.preset, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
