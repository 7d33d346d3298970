"""INT8 / INT4 prefill: the blocked GEMM that dequantises per packed tile against the older path
(dequantised fp32 tiles multiplied by torch.mm), interleaved in one process on the same model.

Run from the repository root after `python -m bench.vs_llamacpp` has written its glm-600m fp16 checkpoint
(or pass `--checkpoint`):

    python -m bench.quantized_prefill --json bench/results/quantized-prefill.json

It times `glm.decoding.generate(..., 1)` (prefill of `--prompt` random ids, logits of the last position, one
token), median of `--rounds`, each path's registration switched in `quantization.cpu` between calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.benchmark import memory_bandwidth
from bench.machine import cpu_name
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.loading import load_model
from glm.quantize import quantization_transform
from quantization import cpu

PATHS = ("blocked GEMM, per-tile dequantisation", "dequantised tiles + torch.mm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/tmp/glm-vs-llamacpp/glm-600m-fp16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 50000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    bandwidth = memory_bandwidth(torch.device("cpu"), 5)["median_gb_per_s"]
    results = {}
    for bits in (8, 4):
        transform = quantization_transform(bits, output_layer=True)
        model, _ = load_model(args.checkpoint, transforms=[transform])
        registered = list(cpu._prefill_gemm)
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        for round_ in range(args.rounds + 1):  # the first round warms up
            for name in PATHS:
                cpu._prefill_gemm[:] = registered if name == PATHS[0] else []
                start = time.perf_counter()
                generate(model, [prompt], BaseStrategy(1, top_k=1), 1)
                if round_:
                    times[name].append(time.perf_counter() - start)
        cpu._prefill_gemm[:] = registered
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[f"INT{bits}"] = {"prefill_s": medians, "speedup": medians[PATHS[1]] / medians[PATHS[0]]}
        print(f"INT{bits}: " + ", ".join(f"{n} {s:.3f} s" for n, s in medians.items()), flush=True)
    print(f"{cpu_name()}, {args.threads} threads, fp32 torch.mv {bandwidth:.1f} GB/s")
    if args.json:
        record = {"cpu": cpu_name(), "bandwidth_gb_s": bandwidth, "prompt": args.prompt, "results": results}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
