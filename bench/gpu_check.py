"""The tensor-parallel checks on GPUs with NCCL: `python bench/gpu_check.py` (about 3-6 minutes).

What tests/test_tensor_parallel.py and tests/test_distributed.py check on CPU with gloo, here on CUDA with
NCCL, one GPU per rank, for every TP size the machine has GPUs for (2, 4, 8):
1. sat_tiny at TP = 2 and 4, and an 8-head model saved with 4 shards at TP = 2 and 8: logits equal to one
   GPU within 1e-4 (fp32, TF32 off), identical greedy and deterministic beam-search tokens, the sampled
   tokens identical on every rank (and, reported, equal to one GPU's);
2. `MP_SIZE=N bash scripts/generate.sh --device cuda` in file mode writes what one GPU writes;
3. `NPROC=N bash scripts/evaluate.sh --device cuda` (N data-parallel replicas) gives one GPU's metrics.
Without CUDA it says so and exits 0; with one GPU only the single-GPU reference runs (NCCL needs one GPU per
rank). Exit status 1 if any check fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def _worker(rank: int, jobs: list[tuple[str, str | None]], out: str) -> None:
    from test_tensor_parallel import SAT_TINY, outputs

    from glm import distributed, tensor_parallel
    from glm.config import get_preset
    from glm.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)
    reference = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in reference.items()}
    parallel = distributed.initialize(device="cuda")
    results = []
    for folder, preset in jobs:
        model, _ = load_model(
            folder,
            config=get_preset(preset) if preset else None,
            dtype="float32",
            device=f"cuda:{parallel.local_rank}",
            transforms=[tensor_parallel.transform()],
        )
        result = outputs(model, reference)
        results.append({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()})
    torch.save({"tensor_rank": parallel.tensor_rank, "results": results}, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def single_gpu(jobs: list[tuple[str, str | None]]) -> list[dict]:
    from test_tensor_parallel import SAT_TINY, outputs

    from glm.config import get_preset
    from glm.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    reference = torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)
    reference = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in reference.items()}
    results = []
    for folder, preset in jobs:
        config = get_preset(preset) if preset else None
        model, _ = load_model(folder, config=config, dtype="float32", device="cuda:0")
        result = outputs(model, reference)
        results.append({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()})
    return results


def model_checks(gpus: int, tmp: Path) -> None:
    from ranks import run_ranks
    from test_tensor_parallel import SAT_TINY, eight_head_config

    from glm.checkpoint import save_checkpoint
    from glm.model import GLM, init_random_weights

    config = eight_head_config()
    with torch.device("meta"):
        model = GLM(config)
    model = init_random_weights(model.to_empty(device="cpu"), seed=3, std=0.08)
    eight = tmp / "eight_heads_tp4"
    save_checkpoint(model.state_dict(), eight, config, tensor_parallel_size=4)
    sat = (str(SAT_TINY / "ckpt"), "sat-tiny")
    plan = {2: [sat, (str(eight), None)], 4: [sat], 8: [(str(eight), None)]}
    expected = dict(zip(["sat", "eight"], single_gpu([sat, (str(eight), None)]), strict=True))
    torch.testing.assert_close(
        expected["sat"]["logits"],
        torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)["logits_full"],
        atol=1e-4,
        rtol=0,
    )
    check(True, "one GPU reproduces the original's sat_tiny logits within 1e-4")
    for size, jobs in plan.items():
        if size > gpus:
            print(f"skip  TP {size}: {gpus} GPU(s)")
            continue
        out = tmp / f"tp{size}"
        out.mkdir()
        start = time.time()
        run_ranks(_worker, size, jobs, str(out), timeout=240)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(size)]
        for job, (folder, _) in enumerate(jobs):
            name = "sat" if folder == sat[0] else "eight"
            want = expected[name]
            for rank in ranks:
                got = rank["results"][job]
                close = all(
                    torch.allclose(got[k], want[k], atol=1e-4, rtol=0) for k in ("logits", "incremental")
                )
                check(close, f"TP {size} {name} rank {rank['tensor_rank']}: logits within 1e-4 of one GPU")
                same = got["greedy"] == want["greedy"] and got["beam"] == want["beam"]
                check(same, f"TP {size} {name} rank {rank['tensor_rank']}: greedy and beam tokens")
            sampled = [r["results"][job]["sampled"] for r in ranks]
            check(
                all(s == sampled[0] for s in sampled), f"TP {size} {name}: sampled tokens equal on all ranks"
            )
            print(
                f"info  TP {size} {name}: sampled tokens equal to one GPU's: {sampled[0] == want['sampled']}"
            )
        print(f"info  TP {size}: {time.time() - start:.1f} s")


def run_script(name: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    from ranks import subprocess_env

    command = ["bash", str(ROOT / "scripts" / name), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=subprocess_env(**env), cwd=ROOT
    )


def cli_checks(gpus: int, tmp: Path) -> None:
    queries = tmp / "queries.txt"
    queries.write_text("a\tTsinghua University is located in [MASK].\nb\t床前明月光，\n")
    flags = ["--input-source", str(queries), "--with-id", "--out-seq-length", "48", "--device", "cuda"]
    runs = {}
    for size in (1, min(gpus, 2)):
        done = run_script(
            "generate.sh", [*flags, "--output-path", str(tmp / f"gen{size}")], MP_SIZE=str(size)
        )
        check(done.returncode == 0, f"generate.sh MP_SIZE={size} on cuda" + ("" if not done.returncode else
              f": {done.stderr[-1500:]}"))  # fmt: skip
        runs[size] = {p.name: p.read_text() for p in sorted((tmp / f"gen{size}").glob("*.txt"))}
    if gpus >= 2:
        check(runs[1] == runs[2], "generate.sh MP_SIZE=2 writes what one GPU writes")
        tasks = [str(ROOT / "tasks" / "offline" / "zh_idiom_cloze.yaml"), "--limit", "9", "--device", "cuda"]
        metrics = {}
        for nproc in (1, 2):
            out = tmp / f"eval{nproc}"
            done = run_script("evaluate.sh", [*tasks, "--output-dir", str(out)], NPROC=str(nproc))
            check(done.returncode == 0, f"evaluate.sh NPROC={nproc} on cuda")
            if done.returncode == 0:
                (report,) = out.glob("evaluate-*.json")
                metrics[nproc] = [t["groups"] for t in json.loads(report.read_text())["tasks"]]
        check(
            metrics.get(1) == metrics.get(2), "evaluate.sh with 2 data-parallel replicas: one GPU's metrics"
        )


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (this check needs GPUs; the CPU/gloo variants are the tests)")
        return 0
    gpus = torch.cuda.device_count()
    name, nccl = torch.cuda.get_device_name(0), torch.cuda.nccl.version()
    print(f"{gpus} x {name}, torch {torch.__version__}, NCCL {nccl}")
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model_checks(gpus, Path(tmp))
        cli_checks(gpus, Path(tmp))
    print(f"{len(failures)} failure(s) in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
