"""Decode and prefill speed of the quantized model against fp32 and bf16, in one run on one machine.

    python -m bench.quantization --output bench/results/quant-cpu.json

glm-600m with random weights (std 0.02), batch 1. For each precision: prefill --prompt-length tokens, then
--decode-tokens greedy single-token steps with the KV cache (bench/benchmark.py's decode_run: the model is
called directly, no sampling strategy); then one --prefill-length-token prefill alone (logits at the last
position). Weight bytes per decode step = every parameter and buffer the step reads: all but the word
embeddings (one row is looked up) plus the output layer's weights (the tied embeddings, or the INT8 copy).
The machine's matrix-vector bandwidth (fp32 torch.mv over 1 GiB) is measured in the same run, and the
CPU's model name and ISA are recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.benchmark import build_model, cpu_snapshot, decode_run, memory_bandwidth, other_cores
from bench.machine import cpu_name
from glm.config import get_preset
from glm.loading import load_weights
from glm.model import GLM
from glm.quantize import quantization_transform
from quantization.cpu import native_kernels


class InMemoryCheckpoint:
    """A state dict with the interface glm.loading.load_weights reads (one rank, nothing to release)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.state_dict, self.keys, self.folder = state_dict, list(state_dict), Path("<memory>")

    def shape(self, key: str) -> torch.Size:
        return self.state_dict[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.state_dict[key].dtype

    def read(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        return self.state_dict[key]

    def release(self, key: str, kept: object = None) -> None:
        pass


VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "bf16": None,
    "int8": dict(bits=8),
    "int8 + int8 output layer": dict(bits=8, output_layer=True),
    "int4": dict(bits=4),
    "int4 + int8 output layer": dict(bits=4, output_layer=True),
    "int4 group 128": dict(bits=4, scheme="group", group_size=128),
    "int4 group 128 + int8 output layer": dict(bits=4, scheme="group", group_size=128, output_layer=True),
}


def quantized_model(state_dict: dict[str, torch.Tensor], config, settings: dict[str, Any]) -> GLM:
    with torch.device("meta"):
        model = GLM(config)
    model = quantization_transform(**settings)(model)
    model.compute_device = torch.device("cpu")
    return load_weights(model, InMemoryCheckpoint(state_dict), torch.float32, torch.device("cpu")).eval()


def bytes_per_step(model: GLM) -> int:
    embeddings = model.transformer.word_embeddings.weight
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    head = model.output_layer
    if hasattr(head, "weight_q"):  # the INT8 output layer reads its copy, not the embeddings
        total -= embeddings.numel() * embeddings.element_size()
    return total


def model_bytes(model: GLM) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def time_prefill(model: GLM, length: int, repeats: int) -> float:
    tokens = torch.ones(1, length, dtype=torch.long)
    positions = torch.arange(length)[None]
    mask = torch.zeros(1, 1, length, length, dtype=torch.bool)
    last = torch.full((1, 1), length - 1)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(tokens, positions, mask, model.new_cache(1, length), logits_at=last)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(model: GLM, args: argparse.Namespace) -> dict[str, Any]:
    decode_run(model, args.prompt_length, 4, 1, torch.device("cpu"))  # warm-up
    before = cpu_snapshot()
    prefill, steps = decode_run(model, args.prompt_length, args.decode_tokens, 1, torch.device("cpu"))
    noise = other_cores(before, cpu_snapshot())
    nbytes = bytes_per_step(model)
    result = {
        "prefill_ms": prefill * 1e3,
        "decode_tokens_per_s": len(steps) / sum(steps),
        "ms_per_token_median": statistics.median(steps) * 1e3,
        "weight_bytes_per_step": nbytes,
        "weight_gb_per_s": nbytes * len(steps) / sum(steps) / 1e9,
        "model_bytes": model_bytes(model),
        "other_cores": noise,
    }
    if args.prefill_length:
        before = cpu_snapshot()
        result[f"prefill_{args.prefill_length}_s"] = time_prefill(
            model, args.prefill_length, args.prefill_repeats
        )
        result["prefill_other_cores"] = other_cores(before, cpu_snapshot())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="glm-600m")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (quick runs)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-length", type=int, default=512, help="0 skips the long prefill")
    parser.add_argument("--prefill-repeats", type=int, default=1)
    parser.add_argument("--bandwidth-runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = get_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    setup = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_kernels": native_kernels() is not None,
        "prefill_dtype": "the variant's (fp32 for fp32 and quantized, bf16 for bf16)",
        "preset": args.preset,
        "num_layers": config.num_layers,
        "prompt_length": args.prompt_length,
        "decode_tokens": args.decode_tokens,
        "prefill_length": args.prefill_length,
        "load_average_start": os.getloadavg()[0],
    }
    print(json.dumps(setup), flush=True)
    results: dict[str, Any] = {}
    with torch.no_grad():
        reference = build_model(config, torch.float32, torch.device("cpu"), seed=0)
        state_dict = reference.state_dict()
        for name in args.variants:
            settings = VARIANTS[name]
            if name == "fp32":
                model = reference
            elif name == "bf16":
                model = reference.to(torch.bfloat16)  # last dense variant: converts in place
            else:
                model = quantized_model(state_dict, config, settings)
            results[name] = measure(model, args)
            print(name, json.dumps(results[name]), flush=True)
            del model
            if name == "bf16":
                reference = build_model(config, torch.float32, torch.device("cpu"), seed=0)
                state_dict = reference.state_dict()
        del reference, state_dict
        bandwidth = (
            memory_bandwidth(torch.device("cpu"), args.bandwidth_runs) if args.bandwidth_runs else None
        )
    setup["load_average_end"] = os.getloadavg()[0]

    base = results.get("fp32")
    print(
        f"\nCPU: {setup['cpu']} ({setup['cpu_capability']}, {setup['threads']} threads), "
        f"torch {torch.__version__}"
    )
    if bandwidth:
        print(
            f"Matrix-vector bandwidth (fp32 torch.mv, 1 GiB): {bandwidth['median_gb_per_s']:.1f} GB/s median"
        )
    prefill_key = f"prefill_{args.prefill_length}_s"
    header = (
        "| precision | decode tok/s | x fp32 | ms/token | weight MB/step | weight GB/s | fraction of mv |"
    )
    header += f" prefill {args.prefill_length} s | other-cores |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for name, r in results.items():
        ratio = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else float("nan")
        fraction = r["weight_gb_per_s"] / bandwidth["median_gb_per_s"] if bandwidth else float("nan")
        prefill = f"{r[prefill_key]:.2f}" if prefill_key in r else "-"
        print(
            f"| {name} | {r['decode_tokens_per_s']:.1f} | {ratio:.2f} | {r['ms_per_token_median']:.1f} | "
            f"{r['weight_bytes_per_step'] / 1e6:.0f} | {r['weight_gb_per_s']:.1f} | {fraction:.2f} | "
            f"{prefill} | {r['other_cores']:.2f} |"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"setup": setup, "results": results, "memory_bandwidth": bandwidth}
        args.output.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
