"""Prefill-sized matmuls: the native blocked GEMM (glm/kernels/gemm.h) against F.linear (MKL), interleaved.

`python -m bench.cpu_gemm [--threads 2]`: for each shape (128 prompt tokens against glm-600m's matrices) and
weight dtype, the median of 5 calls of each, GFLOP/s and the ratio, with the CPU's name and the fp32
`torch.mv` bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.benchmark import memory_bandwidth
from bench.machine import cpu_name
from glm.cpu_matmul import native

SHAPES = [(128, 1536, 4608), (128, 4096, 1536), (128, 1536, 8192)]  # rows, K, N


def median_seconds(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = native()
    if kernels is None:
        raise SystemExit("no native kernels here (no AVX2 or no compiler)")
    bandwidth = memory_bandwidth(torch.device("cpu"), 3)["median_gb_per_s"]
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{cpu_name()}, {capability}, {args.threads} threads, mv {bandwidth:.1f} GB/s")
    for m, k, n in SHAPES:
        x, bias = torch.randn(m, k), torch.randn(n)
        for dtype in (torch.float32, torch.float16):
            w = torch.randn(n, k).to(dtype)
            dense = w.float()  # what F.linear needs: the fp32 matrix
            flops = 2 * m * k * n
            ours = median_seconds(lambda x=x, w=w, bias=bias: kernels.linear(x, w, bias))
            mkl = median_seconds(lambda x=x, dense=dense, bias=bias: F.linear(x, dense, bias))
            print(
                f"{m} x {k} -> {n} {str(dtype)[6:]:8} native {flops / ours / 1e9:6.1f} GFLOP/s, "
                f"F.linear {flops / mkl / 1e9:6.1f} GFLOP/s, ratio {mkl / ours:.2f}"
            )


if __name__ == "__main__":
    main()
