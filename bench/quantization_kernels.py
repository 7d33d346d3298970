"""Per-layer kernel times on glm-600m's block shapes, all methods interleaved in one run (so that other
processes' load hits every method alike): `python -m bench.quantization_kernels --help`.

Methods: fp32 F.linear; this project's AVX2 kernel (INT8, INT4); torch's weight-only ops with bf16
activations (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu` g128); fbgemm dynamic W8A8; and the
prefill path (dequantise + fp32 matmul). Each call reads a different copy of the weight (--copies), so the
weights come from memory, not cache. Median ms per call over --repeats rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.load_memory import cpu_name
from quantization.cpu import CPUKernel, dequantized, native_kernels
from quantization.schemes import QuantizationSpec, quantize_to_stored, scale_groups, unpacked_values

SHAPES = {"qkv": (4608, 1536), "dense": (1536, 1536), "h_to_4h": (8192, 1536), "4h_to_h": (1536, 4096)}


def methods(weights: list[torch.Tensor]) -> dict:
    n, k = weights[0].shape
    q8 = [quantize_to_stored(w, QuantizationSpec(8)) for w in weights]
    q4 = [quantize_to_stored(w, QuantizationSpec(4)) for w in weights]
    int8pack = [(w, s.bfloat16()) for w, s in q8]
    int4pack = []
    for w, s in q4:
        packed = torch._convert_weight_to_int4pack_for_cpu((unpacked_values(w, 4).int() + 8).contiguous(), 1)
        sz = scale_groups(s).repeat_interleave(k // 128, 1).t()
        int4pack.append((packed, torch.stack([sz, torch.zeros_like(sz)], -1).bfloat16().contiguous()))
    fbgemm = [
        torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(
                w, (s.float()).double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
            ),
            None,
        )
        for w, (_, s) in zip(weights, q8, strict=True)
    ]
    native = native_kernels()
    table = {
        "fp32 F.linear": lambda x, i: F.linear(x, weights[i]),
        "int8pack_mm bf16": lambda x, i: torch._weight_int8pack_mm(x.bfloat16(), *int8pack[i]),
        "int4pack_mm g128 bf16": lambda x, i: torch._weight_int4pack_mm_for_cpu(
            x.bfloat16(), int4pack[i][0], 128, int4pack[i][1]
        ),
        "fbgemm W8A8 dynamic": lambda x, i: torch.ops.quantized.linear_dynamic(x, fbgemm[i], False),
        "int8 dequantise + fp32": lambda x, i: F.linear(x, dequantized(*q8[i], 8, torch.float32)),
        "int4 dequantise + fp32": lambda x, i: F.linear(x, dequantized(*q4[i], 4, torch.float32)),
    }
    if native is not None:
        table["int8 AVX2 kernel"] = lambda x, i: CPUKernel(8).decode(x, *q8[i])
        table["int4 AVX2 kernel"] = lambda x, i: CPUKernel(4).decode(x, *q4[i])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            weights = [torch.randn(n, k) * 0.02 for _ in range(args.copies)]
            table = methods(weights)
            for rows in args.rows:
                x = torch.randn(rows, k)
                times: dict[str, list[float]] = {m: [] for m in table}
                for r in range(args.repeats):
                    for method, fn in table.items():
                        start = time.perf_counter()
                        fn(x, r % args.copies)
                        times[method].append(time.perf_counter() - start)
                results[f"{name} {n}x{k} M={rows}"] = {
                    m: statistics.median(t) * 1e3 for m, t in times.items()
                }
                print(f"{name} {n}x{k} M={rows}", json.dumps(results[f"{name} {n}x{k} M={rows}"]), flush=True)
    method_names = list(next(iter(results.values())))
    print(
        f"\nCPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads; "
        "median ms\n"
    )
    print("| shape | " + " | ".join(method_names) + " |\n|---|" + "---|" * len(method_names))
    for shape, row in results.items():
        print(f"| {shape} | " + " | ".join(f"{row[m]:.3f}" for m in method_names) + " |")
    if args.output:
        payload = {"cpu": cpu_name(), "threads": args.threads, "results": results}
        args.output.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
