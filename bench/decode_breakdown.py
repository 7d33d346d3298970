"""Where a glm-600m fp16 decode step goes: its matmuls alone against the whole step, and the whole step
with the modules against the fused decode block (glm/cpu_decode.py), interleaved in one process.

Run from the repository root after `python -m bench.vs_llamacpp` has written its checkpoint (or pass
`--checkpoint`):

    python -m bench.decode_breakdown

"matmuls alone" runs the native linear of every block weight and of the output layer once, one row each,
in the model's order (the bytes a step streams); a step is the mean over `--tokens` greedy tokens of
`glm.decoding.generate` after a `--prompt`-token prompt (the first token, from the prefill, not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.benchmark import memory_bandwidth
from bench.machine import cpu_name
from glm import cpu_decode, cpu_matmul
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.loading import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/tmp/glm-vs-llamacpp/glm-600m-fp16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.checkpoint)
    native = cpu_matmul.native()
    if native is None:
        raise SystemExit("the native kernels are not available here (no AVX2 or no compiler)")
    prompt = torch.randint(0, 50000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    names = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    weights = [layer.get_submodule(name).weight for layer in model.transformer.layers for name in names]
    weights.append(model.transformer.word_embeddings.weight)  # the tied output layer
    rows = [torch.randn(1, w.shape[1]) for w in weights]
    streamed = sum(w.numel() * w.element_size() for w in weights)

    def matmuls() -> float:
        start = time.perf_counter()
        for x, w in zip(rows, weights, strict=True):
            native.linear(x, w, None)
        return time.perf_counter() - start

    def step() -> float:
        stamps = [time.perf_counter()]
        strategy = BaseStrategy(1, top_k=1)
        generate(
            model, [prompt], strategy, 1 + args.tokens, on_step=lambda _: stamps.append(time.perf_counter())
        )
        return (stamps[-1] - stamps[1]) / args.tokens

    matmuls(), step()  # warm-up
    times: dict[str, list[float]] = {"matmuls alone": [], "step, modules": [], "step, fused block": []}
    enabled = cpu_decode.ENABLED
    for _ in range(args.rounds):
        times["matmuls alone"].append(matmuls())
        for name, fused in (("step, modules", False), ("step, fused block", True)):
            cpu_decode.ENABLED = fused
            times[name].append(step())
    cpu_decode.ENABLED = enabled
    bandwidth = memory_bandwidth(torch.device("cpu"), 5)["median_gb_per_s"]
    for name, samples in times.items():
        ms = statistics.median(samples) * 1e3
        print(f"{name}: {ms:.1f} ms ({streamed / ms / 1e6:.1f} GB/s of weights)")
    print(f"{cpu_name()}, {args.threads} threads, fp32 torch.mv {bandwidth:.1f} GB/s (after)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
