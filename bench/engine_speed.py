"""Decoding-engine speed, each number beside the memory bandwidth measured just before it.

Run from the repository root: `python -m bench.engine_speed --help`. One run measures:

1. glm-600m (random weights, fp32) batch-1 decode through the engine's `decode_one_token`, greedy argmax:
   weight bytes x tokens/s against fp32 `torch.mv` bandwidth.
2. The bundled 17 M model: 64 greedy tokens through `glm.decoding.generate`, this tree against an older
   checkout (`--baseline-tree`, e.g. `git worktree add /tmp/engine-baseline 3bdd3aa`), interleaved, each the
   best of `--repeats` (the older code runs in a subprocess with that tree first on sys.path); with
   `--compile`, also the engine's compiled decode step.
3. Aggregate tokens/s of 8 concurrent seeded-sampling requests through the continuous-batching engine
   against one request (glm-600m), wall time with prefill.
4. HF transformers' Llama of glm-600m's shape (random weights, eager attention, same dtype) against
   `generate`: prompt 128 + 64 new tokens (greedy, no early end), batch 1 and 8, wall time with prefill.

`--breakdown` instead times only the bundled model's decode step with and without its matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.benchmark import build_model, cpu_snapshot, memory_bandwidth, other_cores, weight_bytes
from bench.machine import cpu_name
from glm.config import get_preset
from glm.decoding import generate
from glm.decoding.engine import Engine
from glm.decoding.requests import Request
from glm.decoding.rows import Rows
from glm.decoding.strategies import BaseStrategy
from glm.query import context_inputs

BUNDLED_PROBE = """
import json, sys, time, torch
torch.set_num_threads({threads})
from glm.api import load
from glm.decoding import generate
try:
    from glm.decoding.strategies import BaseStrategy
except ImportError:  # a baseline tree from before the one-step layout (3bdd3aa)
    from glm.strategies import BaseStrategy
model, tokenizer = load({checkpoint!r})
context = tokenizer.tokenize("It is a truth universally acknowledged that a single man") + [
    tokenizer.get_command("[gMASK]"), tokenizer.sop_id]
generate(model, [context], BaseStrategy(1, top_k=1), 8)  # warm-up
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    (beams,) = generate(model, [context], BaseStrategy(1, top_k=1), {tokens})
    times.append(time.perf_counter() - start)
    assert len(beams[0]) == len(context) + {tokens}
print(json.dumps({{"tokens_per_s": {tokens} / min(times), "ids": beams[0][len(context):len(context) + 8]}}))
"""


def bandwidth() -> float:
    return memory_bandwidth(torch.device("cpu"), runs=3)["median_gb_per_s"]


def decode_600m(model, prompt: int, steps: int) -> dict[str, Any]:
    """Batch-1 greedy decode through Rows.decode_one_token; seconds of the decode steps only."""
    rows = Rows(model, 1, 1, prompt + steps + 1)
    ids = [1] * prompt
    positions, mask = context_inputs(prompt, None)
    logits = rows.prefill(0, 0, ids, positions, mask)
    token = int(logits.argmax())
    times = []
    for j in range(steps):
        start = time.perf_counter()
        column = torch.tensor([[prompt + j]])
        logits = rows.decode_one_token(torch.tensor([[token]]), column, column)
        token = int(logits[0, 0].argmax())
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])  # the first steps warm up
    median = times[len(times) // 2]
    return {"tokens_per_s": 1 / median, "weight_gb_per_s": weight_bytes(model) / median / 1e9}


def bundled(tree: Path, threads: int, repeats: int, tokens: int, fused: bool = True) -> dict[str, Any]:
    code = BUNDLED_PROBE.format(
        threads=threads,
        checkpoint=str(Path("models/glm-bilingual").resolve()),
        repeats=repeats,
        tokens=tokens,
    )
    env = {**os.environ, "PYTHONPATH": str(tree), "GLM_FUSED_DECODE": "1" if fused else "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bundled_step_breakdown(steps: int = 20) -> dict[str, float]:
    """ms per decode step of the bundled model through Rows.decode_one_token, as it is and with every native
    matmul replaced by a no-op returning zeros: what the step spends outside the matmuls."""
    from glm import cpu_matmul
    from glm.api import load

    model, _ = load()
    kernels = cpu_matmul.native()
    if kernels is None:
        raise SystemExit("the breakdown needs the native matmul (AVX2 and a compiler)")
    prompt = 16
    rows = Rows(model, 1, 1, prompt + 3 * steps + 8)
    rows.prefill(0, 0, [1] * prompt, *context_inputs(prompt, None))
    zeros: dict[tuple, torch.Tensor] = {}

    class NoMatmul:
        @staticmethod
        def linear(x, weight, bias=None):
            shape = (*x.shape[:-1], weight.shape[0])
            return zeros.setdefault(shape, torch.zeros(shape))

    column = prompt
    times: dict[str, list[float]] = {"with matmuls": [], "matmuls as no-ops": []}
    for _ in range(3):  # interleaved rounds, best taken
        for name, stand_in in (("with matmuls", kernels), ("matmuls as no-ops", NoMatmul())):
            cpu_matmul._kernels[:] = [stand_in]
            start = time.perf_counter()
            for _ in range(steps // 3 + 1):
                at = torch.tensor([[column]])
                rows.decode_one_token(torch.tensor([[5]]), at, at)
                column += 1
            times[name].append((time.perf_counter() - start) / (steps // 3 + 1))
    cpu_matmul._kernels[:] = [kernels]
    return {name: min(t) * 1e3 for name, t in times.items()}


def bundled_engine(threads: int, repeats: int, tokens: int, compile: bool) -> dict[str, Any]:
    from glm.api import load

    torch.set_num_threads(threads)
    model, tokenizer = load()
    context = tokenizer.tokenize("It is a truth universally acknowledged that a single man")
    context += [tokenizer.get_command("[gMASK]"), tokenizer.sop_id]
    engine = Engine(model, 1, 1, len(context) + tokens, compile=compile)
    start = time.perf_counter()
    engine.run([Request(context, BaseStrategy(1, top_k=1), tokens)])  # warm-up (and compilation)
    warm_up = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        (request,) = engine.run([Request(context, BaseStrategy(1, top_k=1), tokens)])
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": tokens / min(times), "warm_up_s": warm_up, "ids": request.outputs[0].ids[:8]}


def aggregate(model, concurrent: int, prompt: int, tokens: int) -> tuple[float, float]:
    """Tokens/s of `concurrent` seeded-sampling requests run together: over the wall time with their
    prefills, and over the decode steps alone (every request running)."""
    engine = Engine(model, groups=concurrent, width=1, max_length=prompt + tokens + 1)

    def request(i: int) -> Request:
        strategy = BaseStrategy(1, top_k=40, generator=torch.Generator().manual_seed(i))
        return Request([1 + i] * prompt, strategy, tokens)

    engine.run([request(99)])  # warm-up
    requests = [request(i) for i in range(concurrent)]
    for r in requests:
        engine.submit(r)
    start = time.perf_counter()
    engine.step()  # admits (prefills) every request, and the first decode step
    steps_start, steps = time.perf_counter(), 0
    while engine.busy:
        engine.step()
        steps += 1
    end = time.perf_counter()
    total = sum(len(r.outputs[0].ids) for r in requests)
    return total / (end - start), concurrent * steps / (end - steps_start)


def ours_vs_hf(model, batch: int, prompt: int, tokens: int) -> float:
    contexts = [[1 + b] * prompt for b in range(batch)]
    generate(model, contexts, BaseStrategy(batch, top_k=1), 2)  # warm-up
    start = time.perf_counter()
    outputs = generate(model, contexts, BaseStrategy(batch, top_k=1), tokens)
    seconds = time.perf_counter() - start
    assert all(len(o[0]) == prompt + tokens for o in outputs)
    return batch * tokens / seconds


def hf_llama(config, dtype: torch.dtype, batch: int, prompt: int, tokens: int, model=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if model is None:
        llama_config = LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.inner_hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
            max_position_embeddings=config.max_sequence_length,
            tie_word_embeddings=True,
            attn_implementation="eager",
            torch_dtype=dtype,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config).to(dtype).eval()
    ids = torch.stack([torch.full((prompt,), 1 + b) for b in range(batch)])
    kwargs = {"do_sample": False, "min_new_tokens": tokens, "max_new_tokens": tokens, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    assert out.shape == (batch, prompt + tokens)
    return batch * tokens / seconds, model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--baseline-tree", type=Path, help="older checkout for the bundled-model comparison")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode step (bundled)")
    parser.add_argument("--repeats", type=int, default=3, help="bundled model: runs, best taken")
    parser.add_argument("--skip-hf", action="store_true", help="skip HF transformers' Llama")
    parser.add_argument(
        "--bundled-only", action="store_true", help="only the bundled model against --baseline-tree"
    )
    parser.add_argument("--rounds", type=int, default=2, help="bundled model: interleaved rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only: the bundled model's decode step with and without its matmuls",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.breakdown:
        capability = torch.backends.cpu.get_cpu_capability()
        print(f"{cpu_name()}, {capability}, {args.threads} threads; mv {bandwidth():.1f} GB/s")
        for name, ms in bundled_step_breakdown().items():
            print(f"bundled decode step, {name}: {ms:.2f} ms")
        return
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "torch": torch.__version__,
        "command": " ".join(["python -m bench.engine_speed", *sys.argv[1:]]),
    }
    before = cpu_snapshot()
    rows = []

    def record(name: str, value: float, unit: str, bw: float, **extra: Any) -> None:
        rows.append({"measure": name, "value": value, "unit": unit, "mv_gb_per_s": bw, **extra})
        print(f"{name}: {value:.2f} {unit} (mv bandwidth {bw:.1f} GB/s) {extra or ''}", flush=True)

    # 2. the bundled model, old and new interleaved
    if args.baseline_tree is not None:
        for round_ in range(args.rounds):
            bw = bandwidth()
            old = bundled(args.baseline_tree.resolve(), args.threads, args.repeats, 64)
            record(f"bundled generate() old, round {round_ + 1}", old["tokens_per_s"], "tok/s", bw)
            for name, fused in (("new", True), ("new, modules (GLM_FUSED_DECODE=0)", False)):
                new = bundled(Path.cwd(), args.threads, args.repeats, 64, fused)
                record(
                    f"bundled generate() {name}, round {round_ + 1}",
                    new["tokens_per_s"],
                    "tok/s",
                    bw,
                    ratio=new["tokens_per_s"] / old["tokens_per_s"],
                    same_tokens=old["ids"] == new["ids"],
                )
    if args.bundled_only:
        finish(results, rows, before, args.json)
        return
    bw = bandwidth()
    eager = bundled_engine(args.threads, args.repeats, 64, compile=False)
    record("bundled engine eager", eager["tokens_per_s"], "tok/s", bw)
    if args.compile:
        bw = bandwidth()
        compiled = bundled_engine(args.threads, args.repeats, 64, compile=True)
        record(
            "bundled engine torch.compile",
            compiled["tokens_per_s"],
            "tok/s",
            bw,
            compile_s=compiled["warm_up_s"],
            same_tokens=compiled["ids"] == eager["ids"],
        )

    config = get_preset("glm-600m")
    model = build_model(config, torch.float32, torch.device("cpu"), seed=0)
    # 1. glm-600m batch-1 decode against the bandwidth
    bw = bandwidth()
    decode = decode_600m(model, 128, 24)
    record(
        "glm-600m fp32 batch-1 decode",
        decode["tokens_per_s"],
        "tok/s",
        bw,
        weight_gb_per_s=decode["weight_gb_per_s"],
        fraction=decode["weight_gb_per_s"] / bw,
    )
    # 3. continuous batching: 8 concurrent requests against one
    bw = bandwidth()
    one, one_decode = aggregate(model, 1, 32, 24)
    eight, eight_decode = aggregate(model, 8, 32, 24)
    record("glm-600m engine, 1 request, with prefill", one, "tok/s", bw)
    record("glm-600m engine, 8 concurrent, with prefill", eight, "tok/s", bw, ratio=eight / one)
    record("glm-600m engine, 1 request, decode steps", one_decode, "tok/s", bw)
    record(
        "glm-600m engine, 8 concurrent, decode steps",
        eight_decode,
        "tok/s",
        bw,
        ratio=eight_decode / one_decode,
    )
    # 4. HF Llama of the same shape
    if not args.skip_hf:  # interleaved, best of two each: the machine's load moves within minutes
        llama = None
        for batch in (1, 8):
            ours, hf, bws = 0.0, 0.0, []
            for _ in range(2):
                bws.append(bandwidth())
                ours = max(ours, ours_vs_hf(model, batch, 128, 64))
                speed, llama = hf_llama(config, torch.float32, batch, 128, 64, llama)
                hf = max(hf, speed)
            bw = sum(bws) / len(bws)
            record(f"glm-600m generate() batch {batch}, 128 + 64", ours, "tok/s", bw)
            record(f"HF Llama eager batch {batch}, 128 + 64", hf, "tok/s", bw, ours_over_hf=ours / hf)
    finish(results, rows, before, args.json)


def finish(results: dict[str, Any], rows: list[dict[str, Any]], before: Any, path: Path | None) -> None:
    results["other_cores_busy"] = other_cores(before, cpu_snapshot())
    results["rows"] = rows
    print(f"other processes kept {results['other_cores_busy']:.1f} cores busy on average")
    if path:
        path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
