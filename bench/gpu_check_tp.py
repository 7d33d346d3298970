"""The tensor-parallel step of the prepared GPU check (needs 2 GPUs; bench/gpu_check.py runs it).

What tests/test_tensor_parallel.py and tests/test_distributed.py check on CPU with gloo, here on CUDA with
NCCL, one GPU per rank, for every TP size the machine has GPUs for (2, 4, 8):
1. sat_tiny at TP = 2 and 4, and an 8-head model saved with 4 shards at TP = 2 and 8: logits equal to one
   GPU within 1e-4 (fp32, TF32 off), identical greedy and deterministic beam-search tokens, the sampled
   tokens identical on every rank (reported, not checked: equal to one GPU's);
2. `MP_SIZE=2 bash scripts/generate.sh --device cuda` in file mode: greedy in fp32 writes what one GPU
   writes (checked); with the default sampling in fp16 (reported: fp16 sums in another order may change a
   sampled token);
3. `NPROC=2 bash scripts/evaluate.sh --device cuda` (2 data-parallel replicas) gives one GPU's metrics.
Every check runs (a failed one does not stop the others); the step fails if any did.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.gpu_check import ROOT, Skip
from bench.gpu_check_steps import finish

sys.path.insert(0, str(ROOT / "tests"))  # test_tensor_parallel and ranks, here and in the ranks

Job = tuple[str, str | None]  # a checkpoint folder and its preset (None: its own config)


class Checks:
    """Checks and notes, printed as they come (to the step's log)."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        self.checks.append({"ok": bool(ok), "check": what})

    def note(self, what: str) -> None:
        print("info  " + what, flush=True)
        self.notes.append(what)

    @property
    def failures(self) -> list[str]:
        return [c["check"] for c in self.checks if not c["ok"]]


def _on(values: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def _worker(rank: int, jobs: list[Job], out: str) -> None:
    from test_tensor_parallel import SAT_TINY, outputs

    from glm import distributed, tensor_parallel
    from glm.config import get_preset
    from glm.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    parallel = distributed.initialize(device="cuda")  # sets this rank's device, before anything uses one
    device = torch.device("cuda", parallel.local_rank)
    reference = _on(torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True), device)
    results = []
    for folder, preset in jobs:
        model, _ = load_model(
            folder,
            config=get_preset(preset) if preset else None,
            dtype="float32",
            device=device,
            transforms=[tensor_parallel.transform()],
        )
        results.append(_on(outputs(model, reference), "cpu"))
    torch.save({"tensor_rank": parallel.tensor_rank, "results": results}, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def single_gpu(jobs: list[Job]) -> list[dict[str, Any]]:
    from test_tensor_parallel import SAT_TINY, outputs

    from glm.config import get_preset
    from glm.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    reference = _on(torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True), "cuda:0")
    results = []
    for folder, preset in jobs:
        config = get_preset(preset) if preset else None
        model, _ = load_model(folder, config=config, dtype="float32", device="cuda:0")
        results.append(_on(outputs(model, reference), "cpu"))
    return results


def model_checks(checks: Checks, gpus: int, tmp: Path) -> None:
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
    original = torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)["logits_full"]
    close = torch.allclose(expected["sat"]["logits"], original, atol=1e-4, rtol=0)
    checks.check(close, "one GPU reproduces the original's sat_tiny logits within 1e-4")
    for size, jobs in plan.items():
        if size > gpus:
            checks.note(f"TP {size} not run: {gpus} GPUs")
            continue
        out = tmp / f"tp{size}"
        out.mkdir()
        start = time.monotonic()
        try:
            run_ranks(_worker, size, jobs, str(out), timeout=240)
        except Exception as error:  # a rank's error or the timeout: the other sizes still run
            checks.check(False, f"TP {size}: the ranks failed: {type(error).__name__}: {error}")
            continue
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(size)]
        for job, (folder, _) in enumerate(jobs):
            name = "sat" if folder == sat[0] else "eight"
            want = expected[name]
            for rank in ranks:
                got, where = rank["results"][job], f"TP {size} {name} rank {rank['tensor_rank']}"
                close = all(
                    torch.allclose(got[k], want[k], atol=1e-4, rtol=0) for k in ("logits", "incremental")
                )
                checks.check(close, f"{where}: logits within 1e-4 of one GPU")
                same = got["greedy"] == want["greedy"] and got["beam"] == want["beam"]
                checks.check(same, f"{where}: greedy and deterministic beam tokens equal to one GPU's")
            sampled = [r["results"][job]["sampled"] for r in ranks]
            agree = all(s == sampled[0] for s in sampled)
            checks.check(agree, f"TP {size} {name}: sampled tokens equal on all ranks")
            checks.note(
                f"TP {size} {name}: sampled tokens equal to one GPU's: {sampled[0] == want['sampled']}"
            )
        checks.note(f"TP {size}: {time.monotonic() - start:.1f} s")


def run_script(name: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    from ranks import subprocess_env

    command = ["bash", str(ROOT / "scripts" / name), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=subprocess_env(**env), cwd=ROOT
    )


def cli_checks(checks: Checks, tmp: Path) -> None:
    queries = tmp / "queries.txt"
    queries.write_text("a\tTsinghua University is located in [MASK].\nb\t床前明月光，\n")
    flags = ["--input-source", str(queries), "--with-id", "--out-seq-length", "48", "--device", "cuda"]
    modes = {"greedy": ["--top-k", "1", "--top-p", "0", "--dtype", "float32"], "sampled": []}
    runs: dict[tuple[str, int], dict[str, str]] = {}
    for mode, extra in modes.items():
        for size in (1, 2):
            folder = tmp / f"gen-{mode}-{size}"
            done = run_script(
                "generate.sh", [*flags, *extra, "--output-path", str(folder)], MP_SIZE=str(size)
            )
            why = "" if done.returncode == 0 else f": {done.stderr[-1500:]}"
            checks.check(done.returncode == 0, f"generate.sh MP_SIZE={size} {mode} on cuda{why}")
            runs[mode, size] = {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}
    same = runs["greedy", 1] == runs["greedy", 2] and bool(runs["greedy", 1])
    checks.check(same, "generate.sh MP_SIZE=2 greedy (fp32) writes what one GPU writes")
    sampled = runs["sampled", 1] == runs["sampled", 2]
    checks.note(f"generate.sh MP_SIZE=2 sampled (fp16, top-p 0.7) writes what one GPU writes: {sampled}")
    tasks = [str(ROOT / "tasks" / "offline" / "zh_idiom_cloze.yaml"), "--limit", "9", "--device", "cuda"]
    metrics = {}
    for nproc in (1, 2):
        out = tmp / f"eval{nproc}"
        done = run_script("evaluate.sh", [*tasks, "--output-dir", str(out)], NPROC=str(nproc))
        checks.check(done.returncode == 0, f"evaluate.sh NPROC={nproc} on cuda")
        if done.returncode == 0:
            (report,) = out.glob("evaluate-*.json")
            metrics[nproc] = [t["groups"] for t in json.loads(report.read_text())["tasks"]]
    checks.check(
        metrics.get(1) == metrics.get(2) and 1 in metrics,
        "evaluate.sh with 2 data-parallel replicas: one GPU's metrics",
    )


def tp_checks() -> dict[str, Any]:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise Skip(f"needs 2 CUDA GPUs (NCCL: one GPU per rank); {gpus} here")
    checks = Checks()
    with tempfile.TemporaryDirectory() as tmp:
        for part in (lambda: model_checks(checks, gpus, Path(tmp)), lambda: cli_checks(checks, Path(tmp))):
            try:
                part()
            except Exception as error:  # the other part still runs
                traceback.print_exc()
                checks.check(False, f"{type(error).__name__}: {error}")
    sizes = [s for s in (2, 4, 8) if s <= gpus]
    passed = sum(c["ok"] for c in checks.checks)
    detail = f"{passed}/{len(checks.checks)} checks passed (TP {', '.join(map(str, sizes))}, scripts at 2)"
    return finish(detail, {"checks": checks.checks, "notes": checks.notes}, checks.failures)
