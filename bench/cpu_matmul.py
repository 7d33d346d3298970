"""Decode-sized matmuls: glm/kernels/gemv.h against F.linear (MKL), interleaved, on model shapes.

`python -m bench.cpu_matmul --rows 1 8 16 32 --output bench/results/cpu-matmul.json`. Each shape cycles
over enough weight copies (>= 256 MB) that every call streams its weights from memory, as in decode.
The fp32 `torch.mv` bandwidth over a 1 GiB matrix is measured in the same run and printed beside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.benchmark import memory_bandwidth
from bench.machine import cpu_name
from glm.cpu_matmul import native

SHAPES = {  # (out, in)
    "glm-600m qkv": (4608, 1536),
    "glm-600m dense": (1536, 1536),
    "glm-600m h_to_4h": (8192, 1536),
    "glm-600m 4h_to_h": (1536, 4096),
    "glm-600m output": (50048, 1536),
    "bundled h_to_4h": (2048, 384),
    "bundled output": (16064, 384),
}


def per_call(fn, weights, x, repeats: int) -> float:
    for w in weights[:2]:
        fn(x, w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append((time.perf_counter() - start) / len(weights))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], help="weight dtypes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = native()
    if kernels is None:
        raise SystemExit("the native kernel is not available on this machine (no AVX2 or no compiler)")
    bandwidth = memory_bandwidth(torch.device("cpu"), runs=3)["median_gb_per_s"]
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{cpu_name()}, {capability}, {args.threads} threads; mv {bandwidth:.1f} GB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            size = n * k * dtype.itemsize
            weights = [torch.randn(n, k).to(dtype) for _ in range(max(2, int(256e6 // size)))]
            dense = [w.float() for w in weights] if dtype != torch.float32 else weights
            for m in args.rows:
                x = torch.randn(m, k)
                mkl = per_call(lambda a, w: F.linear(a, w), dense, x, args.repeats)
                ours = per_call(kernels.linear, weights, x, args.repeats)
                row = {
                    "shape": name,
                    "weight_dtype": dtype_name,
                    "rows": m,
                    "mkl_fp32_ms": mkl * 1e3,
                    "native_ms": ours * 1e3,
                    "native_gb_per_s": size / ours / 1e9,
                    "speedup": mkl / ours,
                }
                rows.append(row)
                print(
                    f"{name:18} {dtype_name:8} M={m:<3} F.linear fp32 {mkl * 1e3:7.3f} ms  native "
                    f"{ours * 1e3:7.3f} ms ({size / ours / 1e9:5.1f} GB/s)  {mkl / ours:4.2f} x"
                )
            del weights, dense
    if args.output:
        meta = {
            "cpu": cpu_name(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": args.threads,
            "mv_gb_per_s": bandwidth,
            "torch": torch.__version__,
        }
        args.output.write_text(json.dumps({"machine": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
