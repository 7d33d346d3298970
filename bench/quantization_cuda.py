"""The CUDA quantized paths on a GPU machine, in one short run (a few minutes): correctness, then speed.

    python -m bench.quantization_cuda --output bench/results/quant-cuda.json

1. `pytest -m cuda tests/test_quantization.py` (the CUDA kernels against the dequantised reference, and
   quantized sat_tiny on the GPU against the CPU model).
2. One GLM-130B-shaped TP-8 shard of each block linear (12288 -> 4608, 12288 -> 8192, 1536 -> 12288,
   4096 -> 12288) at 1 and 64 rows: fp16 F.linear against INT8 and INT4 (per row, group 128), median of
   100 CUDA-event-timed calls, with the GPU's name and compute capability.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

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
from quantization.schemes import quantize_to_stored, scale_groups

SHAPES = {"qkv": (4608, 12288), "h_to_4h": (8192, 12288), "dense": (12288, 1536), "4h_to_h": (12288, 4096)}


def timed(fn, repeats: int = 100) -> float:
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
    info = {
        "gpu": torch.cuda.get_device_name(device),
        "capability": torch.cuda.get_device_capability(device),
        "torch": torch.__version__,
        "fused_int4": fused_int4_available(device),
    }
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
    rows = []
    specs = {
        "int8": QuantizationSpec(8),
        "int4": QuantizationSpec(4),
        "int4 g128": QuantizationSpec(4, "group", 128),
    }
    with torch.no_grad():
        for name, (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features, device=device, dtype=torch.float16) * 0.02
            for m in (1, 64):
                x = torch.randn(m, in_features, device=device, dtype=torch.float16)
                row = {"layer": name, "rows": m, "fp16_ms": timed(lambda x=x, w=weight: F.linear(x, w))}
                for label, spec in specs.items():
                    stored, scale = quantize_to_stored(weight, spec)
                    kernel, operands = CUDAKernel(spec.bits), (stored, scale)
                    groups = scale_groups(scale).shape[1]
                    size = fused_int4_group_size(out_features, in_features, groups)
                    if spec.bits == 4 and info["fused_int4"] and size is not None:  # as the layer packs
                        kernel, operands = Int4PackKernel(size), pack_int4(stored, scale, size, device)
                    row[f"{label}_ms"] = timed(lambda x=x, k=kernel, o=operands: k(x, *o))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.output:
        args.output.write_text(json.dumps({**info, "tests": tests, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
