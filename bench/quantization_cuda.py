"""The CUDA quantized paths on a GPU machine, in one short run (a few minutes): correctness, then speed.

    python -m bench.quantization_cuda --output bench/results/quant-cuda.json

1. `pytest -m cuda tests/test_quantization.py` (the CUDA kernels against the dequantised reference, and
   quantized sat_tiny on the GPU against the CPU model).
2. One GLM-130B-shaped TP-8 shard of each block linear (12288 -> 4608, 12288 -> 8192, 1536 -> 12288,
   4096 -> 12288) at 1 and 64 rows: fp16 F.linear against INT8 and INT4 (per row, group 128), median of
   100 CUDA-event-timed calls, with the GPU's name and compute capability. Per layer and scheme also the
   memory delta (`torch.cuda.memory_allocated`) of holding the quantized layer ready to run (the stored
   weight and scales, and whatever the kernel keeps after its first call) against the fp16 weight, the
   extra peak of one call, and the output's error against F.linear on the dequantised weight in fp32.

bench/gpu_check.sh runs part 2 as its `kernel` step (`gpu_info`, `kernel_rows`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantization import QuantizationSpec
from quantization.cuda import (
    CUDAKernel,
    Int4PackKernel,
    fused_int4_available,
    fused_int4_group_size,
    pack_int4,
)
from quantization.schemes import dequantize, quantize_to_stored, scale_groups

SHAPES = {"qkv": (4608, 12288), "h_to_4h": (8192, 12288), "dense": (12288, 1536), "4h_to_h": (12288, 4096)}
SPECS = {
    "int8": QuantizationSpec(8),
    "int4": QuantizationSpec(4),
    "int4 g128": QuantizationSpec(4, "group", 128),
}
MIB = 2**20


def timed(fn: Callable[[], Any], repeats: int = 100) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_info(device: torch.device) -> dict[str, Any]:
    return {
        "gpu": torch.cuda.get_device_name(device),
        "capability": torch.cuda.get_device_capability(device),
        "torch": torch.__version__,
        "fused_int4": fused_int4_available(device),
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


def _held(device: torch.device, weight: torch.Tensor, spec: QuantizationSpec) -> tuple[Any, int]:
    """A kernel and its operands as a loaded layer holds them (INT4 packed for the fused kernel where it
    runs, the stored copy dropped), after one call, and the bytes they hold together."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    stored, scale = quantize_to_stored(weight, spec)
    size = fused_int4_group_size(weight.shape[0], weight.shape[1], scale_groups(scale).shape[1])
    if spec.bits == 4 and size is not None and fused_int4_available(device):
        kernel, operands = Int4PackKernel(size), pack_int4(stored, scale, size, device)
        del stored, scale
    else:
        kernel, operands = CUDAKernel(spec.bits), (stored, scale)
    kernel(torch.zeros(1, weight.shape[1], device=device, dtype=weight.dtype), *operands)
    torch.cuda.synchronize(device)
    return (kernel, operands), torch.cuda.memory_allocated(device) - before


def _call_peak(device: torch.device, call: Callable[[], torch.Tensor]) -> int:
    """Bytes one call allocates at its peak beyond what was allocated before it (its output included)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = call()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before


@torch.no_grad()
def kernel_rows(device: torch.device, repeats: int = 100) -> list[dict[str, Any]]:
    """One row per layer shape and row count: times (ms), memory (MiB, and against fp16) and errors."""
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.float16) * 0.02
        fp16_bytes = weight.numel() * weight.element_size()
        held = {label: _held(device, weight, spec) for label, spec in SPECS.items()}
        for m in (1, 64):
            x = torch.randn(m, in_features, device=device, dtype=torch.float16)
            row: dict[str, Any] = {"layer": name, "rows": m, "fp16_mib": fp16_bytes / MIB}
            row["fp16_ms"] = timed(lambda x=x, w=weight: F.linear(x, w), repeats)
            for label, ((kernel, operands), nbytes) in held.items():
                call = lambda x=x, k=kernel, o=operands: k(x, *o)  # noqa: E731
                row[f"{label}_ms"] = timed(call, repeats)
                row[f"{label}_mib"] = nbytes / MIB
                row[f"{label}_vs_fp16"] = nbytes / fp16_bytes
                row[f"{label}_call_peak_mib"] = _call_peak(device, call) / MIB
                stored, scale = quantize_to_stored(weight, SPECS[label])  # deterministic: the same bytes
                reference = F.linear(x.float(), dequantize(stored, scale, SPECS[label].bits))
                row[f"{label}_rel_err"] = relative_error(call(), reference)
            rows.append(row)
        del held, weight
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU: run this on a GPU machine")
    device = torch.device("cuda")
    info = gpu_info(device)
    print(json.dumps(info), flush=True)
    tests = None
    if not args.skip_tests:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_quantization.py"],
            capture_output=True,
            text=True,
        )
        tests = {"returncode": run.returncode, "tail": run.stdout[-3000:] + run.stderr[-2000:]}
        print(tests["tail"], flush=True)
    rows = kernel_rows(device)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.output:
        args.output.write_text(json.dumps({**info, "tests": tests, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
