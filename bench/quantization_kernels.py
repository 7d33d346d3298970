"""Per-layer CPU kernel times on glm-600m's shapes, every method interleaved in one run (so that other
processes' load hits every method alike): `python -m bench.quantization_kernels --help`.

Decode (--rows, <= 8): fp32 F.linear (MKL); the dense native kernel (glm/kernels/gemv.h) with fp32 and
fp16 weights, the fp32 model's own baseline; this project's AVX2 quantized kernel (INT8, INT4 per row,
INT4 group 128); optionally an older quantized kernel source (--baseline-kernel, e.g. `git show
HEAD~1:quantization/cpu_kernels.cpp > /tmp/old.cpp`) and torch's built-in weight-only ops (--builtins).
Prefill (--prefill-rows): fp32 F.linear on the float weight against the quantized prefill path
(dequantise into a kept buffer + matmul, quantization/cpu.py) and the old one (a fresh float weight per
call). Each call reads a different copy of the weight (enough copies for --cycle-mb per method), so the
weights come from memory, not cache. Prints median ms per call, weight GB/s, each method's ratio to the
fastest dense one, per-token sums (16 blocks + the output layer) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.machine import cpu_name
from glm.cpu_matmul import native as dense_native
from quantization.cpu import CPUKernel, native_kernels
from quantization.native import load_extension
from quantization.schemes import scale_groups

SHAPES = {  # glm-600m (out, in); the output layer is the tied 50048-word embedding
    "qkv": (4608, 1536),
    "dense": (1536, 1536),
    "h_to_4h": (8192, 1536),
    "4h_to_h": (1536, 4096),
    "output": (50048, 1536),
}
LAYERS = 16
DENSE = ("fp32 F.linear", "fp32 native", "fp16 native")

Method = Callable[[Tensor], Tensor]


class Cycle:
    """Weight copies handed out in turn to every method sharing them, so that no call finds its weight in
    the cache from the call before (which a per-round index would do: a 7 MB weight stays in L3)."""

    def __init__(self, items: list) -> None:
        self.items, self.index = items, 0

    def next(self):
        self.index = (self.index + 1) % len(self.items)
        return self.items[self.index]


def copies(nbytes: int, cycle_mb: float) -> int:
    return max(1, -(-int(cycle_mb * 1e6) // nbytes))


def stored_weights(n: int, k: int, bits: int, groups: int, count: int) -> Cycle:
    """Random stored weights (values do not change the kernels' speed) with fp16 scales [n, groups]."""
    g = torch.Generator().manual_seed(bits)
    low = -127 if bits == 8 else -128  # INT4: any byte is two nibbles in [-8, 7]
    return Cycle(
        [
            (
                torch.randint(low, 128, (n, k * bits // 8), dtype=torch.int8, generator=g),
                (torch.rand(n, groups, generator=g) * 1e-3 + 1e-4).half(),
            )
            for _ in range(count)
        ]
    )


def decode_methods(n: int, k: int, args: argparse.Namespace) -> tuple[dict[str, Method], dict[str, int]]:
    """Methods and the weight bytes each reads per call."""
    table: dict[str, Method] = {}
    nbytes: dict[str, int] = {}
    fp32 = Cycle([torch.randn(n, k) * 0.02 for _ in range(copies(4 * n * k, args.cycle_mb))])
    table["fp32 F.linear"] = lambda x: F.linear(x, fp32.next())
    nbytes["fp32 F.linear"] = 4 * n * k
    dense = dense_native()
    if dense is not None:
        fp16 = Cycle([w.half() for w in fp32.items[: copies(2 * n * k, args.cycle_mb)]])
        table["fp32 native"] = lambda x: dense.linear(x, fp32.next())
        table["fp16 native"] = lambda x: dense.linear(x, fp16.next())
        nbytes["fp32 native"], nbytes["fp16 native"] = 4 * n * k, 2 * n * k
    kernels = {"": native_kernels()}
    if args.baseline_kernel:
        kernels[" (baseline)"] = load_extension("glm_quantization_cpu_baseline", args.baseline_kernel)
    for bits, groups, label in ((8, 1, "int8"), (4, 1, "int4"), (4, k // 128, "int4 g128")):
        q = stored_weights(n, k, bits, groups, copies(n * k * bits // 8, args.cycle_mb))
        for suffix, module in kernels.items():
            if module is not None:
                table[label + suffix] = lambda x, m=module, q=q, b=bits: m.gemv(x, *q.next(), b)
                nbytes[label + suffix] = n * k * bits // 8
        if args.builtins and bits == 8:
            table["int8pack_mm bf16"] = lambda x, q=q: CPUKernel(8)._int8pack(x.bfloat16(), *q.next())
            nbytes["int8pack_mm bf16"] = n * k
        if args.builtins and label == "int4 g128":
            packed = Cycle([(CPUKernel(4), weight, scale) for weight, scale in q.items])
            for kernel, weight, scale in packed.items:  # each its own copy of a weight, in the op's layout
                kernel._int4pack_mm(torch.zeros(1, k, dtype=torch.bfloat16), weight, scale)

            def int4pack(x: Tensor, packed: Cycle = packed) -> Tensor:
                kernel, weight, scale = packed.next()
                return kernel._int4pack_mm(x.bfloat16(), weight, scale)

            table["int4pack_mm g128 bf16"] = int4pack
            nbytes["int4pack_mm g128 bf16"] = n * k // 2
    return table, nbytes


def prefill_methods(n: int, k: int) -> dict[str, Method]:
    fp32 = Cycle([torch.randn(n, k) * 0.02 for _ in range(2)])
    table: dict[str, Method] = {"fp32 F.linear": lambda x: F.linear(x, fp32.next())}
    native = native_kernels()
    for bits in (8, 4):
        q = stored_weights(n, k, bits, 1, 2)
        table[f"int{bits} prefill"] = lambda x, q=q, b=bits: CPUKernel(b)(x, *q.next())
        if native is not None:  # the path before: a fresh float weight per call, then F.linear

            def fresh(x: Tensor, q: Cycle = q, b: int = bits) -> Tensor:
                weight, scale = q.next()
                return F.linear(x, native.dequantize(weight, scale_groups(scale), b, torch.empty(n, k)))

            table[f"int{bits} fresh dequantise"] = fresh
    return table


def run(table: dict[str, Method], x: torch.Tensor, repeats: int) -> dict[str, float]:
    for method in table.values():  # warm-up: compile, first-touch
        method(x)
    times: dict[str, list[float]] = {m: [] for m in table}
    for _ in range(repeats):
        for name, method in table.items():
            start = time.perf_counter()
            method(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def report(title: str, results: dict[str, dict[str, float]], cell: Callable[[str, str], str]) -> None:
    methods = list(dict.fromkeys(m for row in results.values() for m in row))
    print(f"\n{title}\n")
    print("| shape | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for shape, row in results.items():
        print(f"| {shape} | " + " | ".join(cell(shape, m) if m in row else "" for m in methods) + " |")


def per_token(results: dict[str, dict[str, float]]) -> None:
    """Matmul ms per token (16 blocks + the output layer) of each precision, against the fp32 model's."""
    by_layer = {shape.split()[0]: row for shape, row in results.items()}
    if not all(name in by_layer for name in SHAPES):
        return
    print(f"\nM={next(iter(results)).rsplit('=', 1)[1]}:", end="")
    blocks = {m: LAYERS * sum(by_layer[s][m] for s in SHAPES if s != "output") for m in by_layer["qkv"]}
    output = by_layer["output"]
    fp32 = "fp32 native" if "fp32 native" in blocks else "fp32 F.linear"
    reference = blocks[fp32] + output[fp32]
    print(f"\nPer token: matmul ms of 16 blocks + the output layer, and x the fp32 model ({fp32}):")
    for m in blocks:
        if m in DENSE:
            print(f"  {m:24s} {blocks[m] + output[m]:7.2f} ms  {reference / (blocks[m] + output[m]):5.2f} x")
            continue
        dense_output = blocks[m] + output[fp32]
        line = f"  {m:24s} {dense_output:7.2f} ms  {reference / dense_output:5.2f} x (fp32 output layer)"
        int8 = "int8" + m.partition(" (")[1] + m.partition(" (")[2]  # the same kernel's INT8
        if int8 in output:
            own = blocks[m] + output[int8]
            line += f"   {own:7.2f} ms  {reference / own:5.2f} x (+ INT8 output layer)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rows", type=int, nargs="*", default=[1], help="decode rows (<= 8)")
    parser.add_argument("--prefill-rows", type=int, nargs="*", default=[], help="e.g. 512")
    parser.add_argument("--cycle-mb", type=float, default=160.0, help="weight copies per method, in MB")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--baseline-kernel", type=Path, help="another cpu_kernels.cpp to compare against")
    parser.add_argument("--builtins", action="store_true", help="also torch's weight-only ops (bf16)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if any(not 1 <= r <= 8 for r in args.rows):
        parser.error("--rows are decode row counts, 1 to 8; give larger ones to --prefill-rows")
    if native_kernels() is None:
        raise SystemExit("the quantized AVX2 kernels are not available here (no AVX2 or no compiler)")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    decode: dict[str, dict[str, float]] = {}
    prefill: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    with torch.inference_mode():
        for name in args.shapes:
            n, k = SHAPES[name]
            if args.rows:
                table, sizes = decode_methods(n, k, args)
                for rows in args.rows:
                    key = f"{name} {n}x{k} M={rows}"
                    decode[key], nbytes[key] = run(table, torch.randn(rows, k), args.repeats), sizes
                    print(key, json.dumps({m: round(t, 4) for m, t in decode[key].items()}), flush=True)
                del table
            for rows in args.prefill_rows:
                table = prefill_methods(n, k)
                key = f"{name} {n}x{k} M={rows}"
                prefill[key] = run(table, torch.randn(rows, k), args.prefill_repeats)
                print(key, json.dumps({m: round(t, 3) for m, t in prefill[key].items()}), flush=True)
                del table
    load_after = os.getloadavg()
    print(f"\nCPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads")
    loads = [" / ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after)]
    print(f"load average (1 / 5 / 15 min) before {loads[0]}, after {loads[1]}")
    if decode:
        report(
            "Decode: median ms per call (weight GB/s)",
            decode,
            lambda s, m: f"{decode[s][m]:.3f} ({nbytes[s][m] / decode[s][m] / 1e6:.1f})",
        )
        for rows in args.rows:
            per_token({s: r for s, r in decode.items() if s.endswith(f" M={rows}")})
    if prefill:
        report(
            "Prefill: median ms per call (x fp32 F.linear's time)",
            prefill,
            lambda s, m: f"{prefill[s][m]:.1f} ({prefill[s][m] / prefill[s]['fp32 F.linear']:.2f})",
        )
    if args.output:
        payload = {
            "cpu": cpu_name(),
            "threads": args.threads,
            "load_average_before_after": [load_before, load_after],
            "decode": decode,
            "prefill": prefill,
        }
        args.output.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
