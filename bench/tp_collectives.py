"""Collectives per generated token under tensor parallelism, counted in real gloo processes:
`python -m bench.tp_collectives --help`.

N ranks (started here as torchrun would) shard a random-weight model, prefill a prompt and decode tokens
with greedy sampling; every call of torch.distributed's all_reduce / all_gather / broadcast is counted with
its payload. Reported per decoded token (prefill excluded) beside the formula the transform implies:
2 all-reduces of [b, 1, h] per layer + 1 for the embeddings, 1 all-gather of the logits [b, 1, V/N] per rank,
and 1 broadcast of rank 0's decision (glm.distributed.SynchronizedStrategy). Wire bytes are what a ring
all-reduce sends per rank (2 (N-1)/N x payload) and what an all-gather sends per rank ((N-1)/N x output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.machine import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ranks import free_port, launcher_env


def _worker(rank: int, world: int, port: int, preset: str, prompt: int, steps: int, out: str) -> None:
    os.environ.update(launcher_env(rank, world, port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from glm import distributed, tensor_parallel
    from glm.config import get_preset
    from glm.decoding import generate
    from glm.decoding.strategies import BaseStrategy
    from glm.model import GLM, init_random_weights

    distributed.initialize()
    config = get_preset(preset)
    with torch.device("meta"):
        model = GLM(config)
    model = tensor_parallel.transform()(model).to_empty(device="cpu")
    init_random_weights(model, seed=rank)
    model.compute_device = torch.device("cpu")
    model.eval()

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [calls, payload bytes]
    counting = [False]

    def counted(name, function, payload):
        def wrapper(*args, **kwargs):
            if counting[0]:
                counts[name][0] += 1
                counts[name][1] += payload(*args)
            return function(*args, **kwargs)

        return wrapper

    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    dist.all_reduce = counted("all_reduce", dist.all_reduce, lambda t, *a: size(t))
    dist.all_gather = counted("all_gather", dist.all_gather, lambda parts, t, *a: size(t) * len(parts))
    dist.broadcast = counted("broadcast", dist.broadcast, lambda t, *a: size(t))

    context = [[5 + i % 100 for i in range(prompt - 1)] + [config.vocab_size - 1]]
    strategy = BaseStrategy(1, top_k=1)  # no end token: exactly `steps` tokens
    generate(model, context, strategy, 1)  # warm-up
    counting[0] = True
    start = time.perf_counter()
    generate(model, context, strategy, 1)  # prefill + first token: subtracted below
    prefill = {k: list(v) for k, v in counts.items()}
    prefill_s = time.perf_counter() - start
    generate(model, context, strategy, steps + 1)
    total_s = time.perf_counter() - start - 2 * prefill_s
    per_token = {
        k: [(v[0] - 2 * prefill.get(k, [0, 0])[0]) / steps, (v[1] - 2 * prefill.get(k, [0, 0])[1]) / steps]
        for k, v in counts.items()
    }
    if rank == 0:
        Path(out).write_text(json.dumps({"per_token": per_token, "ms_per_token": 1000 * total_s / steps}))
    distributed.shutdown()


def expected(preset: str, world: int, batch: int = 1) -> dict[str, list[float]]:
    """The transform's formula, per decoded token, fp32 payloads."""
    from glm.config import get_preset

    c = get_preset(preset)
    if world == 1:
        return {}
    return {
        "all_reduce": [2 * c.num_layers + 1, (2 * c.num_layers + 1) * batch * c.hidden_size * 4],
        "all_gather": [1, batch * c.vocab_size * 4],
        "broadcast": [1, (2 + 2 * batch) * 8],
    }


def wire_bytes(name: str, payload: float, world: int) -> float:
    if name == "all_reduce":
        return 2 * (world - 1) / world * payload
    if name == "all_gather":
        return (world - 1) / world * payload
    return payload if world > 1 else 0  # broadcast: the root sends the payload to each peer once (tree)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="glm-600m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=8, help="decoded tokens counted")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    rows = []
    for world in args.sizes:
        out = Path(f"/tmp/tp_collectives_{os.getpid()}_{world}.json")
        mp.start_processes(
            _worker,
            args=(world, free_port(), args.preset, args.prompt, args.steps, str(out)),
            nprocs=world,
            start_method="spawn",
        )
        result = json.loads(out.read_text())
        out.unlink()
        rows.append({"tensor_parallel": world, **result, "formula": expected(args.preset, world)})
        print(json.dumps(rows[-1]), flush=True)

    setting = f"{args.preset}, batch 1, prompt {args.prompt}, {args.steps} tokens, fp32, gloo"
    print(f"\n{setting}; CPU: {cpu_name()}\n")
    print("| TP | collective | calls/token | payload B/token | formula: calls, B | wire B/token/rank |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for name, (calls, payload) in sorted(row["per_token"].items()):
            f_calls, f_bytes = row["formula"].get(name, [0, 0])
            wire = wire_bytes(name, payload, row["tensor_parallel"])
            print(
                f"| {row['tensor_parallel']} | {name} | {calls:g} | {payload:,.0f} | "
                f"{f_calls:g}, {f_bytes:,.0f} | {wire:,.0f} |"
            )
    print("\n| TP | ms/token (2 cores shared by all ranks) |\n|---|---|")
    for row in rows:
        print(f"| {row['tensor_parallel']} | {row['ms_per_token']:.0f} |")
    if args.output:
        args.output.write_text(json.dumps({"cpu": cpu_name(), "preset": args.preset, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
