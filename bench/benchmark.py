"""Inference benchmark for a GLM-shaped model with random weights.

Run from the repository root: `python -m bench.benchmark --help`.

1. Encode, as GLM-130B's benchmark.py: one no-grad forward per sequence length, all-ones tokens, arange
   positions, a random boolean mask. Deviation: the mask's diagonal is left unmasked, so no row is fully
   masked. Logits are computed for every position, as in the original. Median of --repeats, warm-up excluded.
2. Batch-1 decode: prefill --prompt-length tokens, then --decode-tokens single-token forwards with the KV
   cache, calling the model directly with greedy argmax (no sampling strategy). Warm-up excluded.
3. The machine's memory bandwidth (fp32 `torch.mv` over a 1 GiB matrix), to put decode's weight traffic
   (every parameter read once per step; the tied embedding once, for the output layer) against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import cpu_name
from glm.config import PRESETS, GLMConfig, get_preset
from glm.loading import DTYPES, resolve_dtype
from glm.model import GLM, init_random_weights


def now(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, this process's CPU seconds, wall seconds); NaN without Linux's
    /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return math.nan, math.nan, time.perf_counter()
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system, time.perf_counter()


def other_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average cores that other processes (and the hypervisor's steal) kept busy between two snapshots."""
    busy, own, wall = (a - b for a, b in zip(after, before, strict=True))
    return math.nan if math.isnan(busy) else max(busy - own, 0.0) / wall


def build_model(config: GLMConfig, dtype: torch.dtype, device: torch.device, seed: int) -> GLM:
    with torch.device("meta"):
        model = GLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    return init_random_weights(model, seed=seed).eval()


def weight_bytes(model: GLM) -> int:
    # parameters() yields the tied embedding once: it is read once per step, by the output layer.
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward_flops(config: GLMConfig, batch: int, s: int, t: int, logit_rows: int) -> float:
    """Matmul FLOPs of one forward of s new tokens over t keys, with logits for logit_rows positions."""
    h, inner = config.hidden_size, config.inner_hidden_size
    per_token = config.num_layers * (4 * h * h + 3 * inner * h)  # qkv, dense, h->2*inner, inner->h
    attention = config.num_layers * 2 * s * t * h  # q @ k^T and probs @ v
    return 2.0 * batch * (s * per_token + attention + logit_rows * config.vocab_size * h)


def bench_encode(
    model: GLM, lengths: list[int], repeats: int, batch: int, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    results = []
    for n in lengths:
        tokens = torch.ones(batch, n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device).expand(batch, n)
        mask = torch.randn(1, 1, n, n, generator=generator) < 0.5  # as the original; True = masked here
        mask.diagonal(dim1=-2, dim2=-1).fill_(False)  # deviation: no fully masked row
        mask = mask.to(device)
        model(tokens, positions, mask)  # warm-up
        times, others = [], []
        for _ in range(repeats):
            before, start = cpu_snapshot(), now(device)
            model(tokens, positions, mask)
            times.append(now(device) - start)
            others.append(other_cores(before, cpu_snapshot()))
        seconds = statistics.median(times)
        print(f"Encode {n}: {seconds * 1e3:.2f} ms", flush=True)
        results.append(
            {
                "seq_len": n,
                "median_ms": seconds * 1e3,
                "min_ms": min(times) * 1e3,
                "times_ms": [x * 1e3 for x in times],
                "other_cores": others,
                "tokens_per_s": batch * n / seconds,
                "gflops_per_s": forward_flops(model.config, batch, n, n, n) / seconds / 1e9,
            }
        )
    return results


def decode_run(
    model: GLM, prompt_length: int, steps: int, batch: int, device: torch.device
) -> tuple[float, list[float]]:
    """Prefill, then `steps` single-token forwards fed with the greedy token; returns their seconds."""
    cache = model.new_cache(batch, prompt_length + steps)
    tokens = torch.ones(batch, prompt_length, dtype=torch.long, device=device)
    positions = torch.arange(prompt_length, device=device).expand(batch, -1)
    context_mask = torch.zeros(1, 1, prompt_length, prompt_length, dtype=torch.bool, device=device)
    last = torch.full((batch, 1), prompt_length - 1, device=device)
    start = now(device)
    logits = model(tokens, positions, context_mask, cache, logits_at=last)  # [b, 1, V]
    prefill = now(device) - start
    step_times = []
    for column in range(prompt_length, prompt_length + steps):
        start = now(device)
        token = logits[:, -1].argmax(dim=-1, keepdim=True)  # [b, 1]
        position = torch.full((batch, 1), column, device=device)
        mask = torch.zeros(1, 1, 1, column + 1, dtype=torch.bool, device=device)  # sees everything so far
        logits = model(token, position, mask, cache)
        step_times.append(now(device) - start)
    return prefill, step_times


def bench_decode(
    model: GLM, prompt_length: int, steps: int, batch: int, device: torch.device
) -> dict[str, Any]:
    decode_run(model, prompt_length, min(steps, 4), batch, device)  # warm-up
    before = cpu_snapshot()
    prefill, times = decode_run(model, prompt_length, steps, batch, device)
    others = other_cores(before, cpu_snapshot())
    total = sum(times)
    nbytes = weight_bytes(model)
    return {
        "method": "model + KVCache, greedy argmax (no sampling strategy)",
        "prefill_ms": prefill * 1e3,
        "steps": steps,
        "total_s": total,
        "tokens_per_s": batch * steps / total,
        "ms_per_token_mean": total / steps * 1e3,
        "ms_per_token_median": statistics.median(times) * 1e3,
        "ms_per_token_min": min(times) * 1e3,
        "weight_bytes_per_step": nbytes,
        "weight_gb_per_s": nbytes * steps / total / 1e9,
        "other_cores": others,
    }


def memory_bandwidth(device: torch.device, runs: int) -> dict[str, Any]:
    """GB/s of matrix bytes read by fp32 torch.mv over a 1 GiB matrix (median and best of `runs`)."""
    n = 16384  # 16384^2 fp32 = 1 GiB
    matrix = torch.ones(n, n, device=device)
    vector = torch.ones(n, device=device)
    torch.mv(matrix, vector)  # warm-up
    times = []
    before = cpu_snapshot()
    for _ in range(runs):
        start = now(device)
        torch.mv(matrix, vector)
        times.append(now(device) - start)
    nbytes = matrix.numel() * matrix.element_size()
    return {
        "kernel": "torch.mv fp32 16384x16384",
        "runs": runs,
        "median_gb_per_s": nbytes / statistics.median(times) / 1e9,
        "best_gb_per_s": nbytes / min(times) / 1e9,
        "other_cores": other_cores(before, cpu_snapshot()),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--preset", default="glm-600m", choices=list(PRESETS), help="model shape")
    parser.add_argument("--layers", type=int, help="override the preset's num_layers (quick runs)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight/activation dtype")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of encode and decode")
    parser.add_argument(
        "--encode-lengths",
        type=int,
        nargs="*",
        default=[512, 1024, 2048],
        help="encode sequence lengths; none skips the encode",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed encode forwards per length")
    parser.add_argument("--prompt-length", type=int, default=128, help="decode: context prefilled first")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode: timed single-token steps")
    parser.add_argument("--bandwidth-runs", type=int, default=9, help="torch.mv runs; 0 skips the probe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the encode masks")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args()
    if min(args.repeats, args.prompt_length, args.decode_tokens, args.batch_size, args.threads) < 1:
        parser.error("--repeats, --prompt-length, --decode-tokens, --batch-size and --threads must be >= 1")
    return args


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = get_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    load_start = os.getloadavg()[0]
    model = build_model(config, dtype, device, args.seed)

    setup = {
        "preset": args.preset,
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "encode_lengths": args.encode_lengths,
        "repeats": args.repeats,
        "prompt_length": args.prompt_length,
        "decode_tokens": args.decode_tokens,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print("Setup: " + ", ".join(f"{k}={v}" for k, v in setup.items() if k != "config"))
    print("Config: " + ", ".join(f"{k}={v}" for k, v in setup["config"].items()), flush=True)

    encode = bench_encode(model, args.encode_lengths, args.repeats, args.batch_size, device, args.seed)
    decode = bench_decode(model, args.prompt_length, args.decode_tokens, args.batch_size, device)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    del model
    bandwidth = memory_bandwidth(device, args.bandwidth_runs) if args.bandwidth_runs > 0 else None
    load_end = os.getloadavg()[0]

    if encode:
        print()
        encode_rows = [
            [
                str(r["seq_len"]),
                f"{r['median_ms']:.2f}",
                f"{r['min_ms']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['gflops_per_s']:.1f}",
                f"{max(r['other_cores']):.2f}",
            ]
            for r in encode
        ]
        header = ["seq len", "median ms", "min ms", "tokens/s", "matmul GFLOP/s", "other-cores (max)"]
        print(markdown_table(header, encode_rows))
    print()
    header = [
        f"prefill {args.prompt_length} ms",
        "decode tokens/s",
        "ms/token (mean)",
        "ms/token (median)",
        "GB weights/step",
        "weight GB/s",
        "other-cores",
    ]
    row = [
        f"{decode['prefill_ms']:.1f}",
        f"{decode['tokens_per_s']:.2f}",
        f"{decode['ms_per_token_mean']:.1f}",
        f"{decode['ms_per_token_median']:.1f}",
        f"{decode['weight_bytes_per_step'] / 1e9:.3f}",
        f"{decode['weight_gb_per_s']:.1f}",
        f"{decode['other_cores']:.2f}",
    ]
    if bandwidth:
        header += ["memory GB/s (mv median)", "fraction", "other-cores (mv)"]
        row += [
            f"{bandwidth['median_gb_per_s']:.1f}",
            f"{decode['weight_gb_per_s'] / bandwidth['median_gb_per_s']:.2f}",
            f"{bandwidth['other_cores']:.2f}",
        ]
    print(markdown_table(header, [row]))
    print()
    print(f"Decode method: {decode['method']}, batch {args.batch_size}, {args.decode_tokens} steps")
    print(f"Peak RSS: {peak_rss_mib:.0f} MiB (before the bandwidth probe)")
    print(f"Load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end")
    print("Other-cores: CPU cores that other processes kept busy while timing (noise if well above 0).")

    if args.json:
        results = {
            "setup": setup,
            "encode": encode,
            "decode": decode,
            "memory_bandwidth": bandwidth,
            "peak_rss_mib": peak_rss_mib,
            "load_average_1min": [load_start, load_end],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
