"""The prepared GPU check: `bash bench/gpu_check.sh [--summary PATH] [--only STEP ...]`, under 9 minutes.

Each step (STEPS; the functions are in bench/gpu_check_steps.py and bench/gpu_check_tp.py) runs in a child
python of its own, in its own process group, under its own timeout (and never past the run's budget,
BUDGET_S); the driver records its result and goes on to the next, whatever happened. A step's status is
`ok`, `FAIL` (a check failed, it raised, or it died), `skip` (it cannot run here; the detail says why) or
`timeout` (killed at its deadline). After every step the summary (JSON, default
bench/results/gpu-check.json) is rewritten atomically, so even a killed driver leaves the finished steps;
each step's output goes to `<summary>-logs/<step>.log`. At the end a table is printed.

Without CUDA it is a dry run: the versions step runs, every step that needs a GPU is `skip`, exit status 0.
Exit status 1 when a step FAILs or times out (which only happens where the steps can run: on a GPU).

A step is `module:function`, called with no arguments in the child; it returns a dict with a one-line
`detail` (the rest is kept in the summary as the step's data), raises `Skip(reason)`, or raises
`CheckFailed(message, data)` after running all its comparisons. A step's data with a `gpus` key (the
versions step) tells the driver how many GPUs the later steps may use.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUMMARY = ROOT / "bench" / "results" / "gpu-check.json"
BUDGET_S = 510.0  # the whole run, so that it ends within 9 minutes with start-up and the table
STATUSES = ("ok", "FAIL", "skip", "timeout")


class Skip(Exception):
    """Raised by a step that cannot run here; the message is the reason."""


class CheckFailed(Exception):
    """Raised by a step whose checks failed, with the data it measured."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


class Stopped(Exception):
    """The driver got SIGTERM."""


@dataclass(frozen=True)
class Step:
    name: str
    target: str  # "module:function"
    timeout_s: float
    gpus: int = 1  # CUDA GPUs it needs (0: runs everywhere)
    about: str = ""


@dataclass
class Result:
    step: str
    status: str
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    log: str | None = None


STEPS = [
    Step("versions", "bench.gpu_check_steps:versions", 90, gpus=0, about="torch, CUDA, NCCL, GPUs, sm"),
    Step("nccl", "bench.gpu_check_steps:nccl_smoke", 60, about="NCCL world size 1 on 127.0.0.1, all_reduce"),
    Step("pytest-cuda", "bench.gpu_check_steps:pytest_cuda", 180, about="pytest -m cuda"),
    Step("kernel", "bench.gpu_check_steps:kernel", 90, about="CUDA INT8/INT4 on TP-8 GLM-130B shapes"),
    Step("bundled-fp32", "bench.gpu_check_steps:bundled_fp32", 90, about="greedy CUDA fp32 = CPU"),
    Step("quantized", "bench.gpu_check_steps:quantized", 150, about="INT8/INT4/INT4 g128 CUDA vs CPU"),
    Step("offload", "bench.gpu_check_steps:offload", 120, about="--max-memory 50%: fp16 and INT4"),
    Step("compile", "bench.gpu_check_steps:compile_graphs", 240, about="compile / CUDA graphs on and off"),
    Step("tp", "bench.gpu_check_tp:tp_checks", 450, gpus=2, about="TP 2/4/8 and the scripts on NCCL"),
]


# ---- the child: one step


def run_target(target: str) -> tuple[str, str, dict[str, Any]]:
    """(status, detail, data) of calling `module:function`; a traceback of an error goes to stderr."""
    module, function = target.split(":")
    try:
        data = dict(getattr(importlib.import_module(module), function)())
        return "ok", str(data.pop("detail", "")), data
    except Skip as skip:
        return "skip", str(skip) or "skipped (no reason given)", {}
    except CheckFailed as failed:
        return "FAIL", str(failed), failed.data
    except Exception as error:
        traceback.print_exc()
        return "FAIL", f"{type(error).__name__}: {error}", {}


def _die_with_the_driver() -> None:
    """Linux: when the driver dies, even by SIGKILL, this step gets SIGTERM and kills its process group (it
    leads one: itself and whatever it started), so no step keeps a GPU busy after its driver."""
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_main(target: str, result: Path) -> None:
    _die_with_the_driver()
    status, detail, data = run_target(target)
    sys.stdout.flush()
    write_json(result, {"status": status, "detail": detail, "data": data})


# ---- the driver


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the step and everything it started
    process.wait()


def _log_tail(log: Path, chars: int = 300) -> str:
    text = log.read_text(errors="replace").strip() if log.exists() else ""
    return " ".join(text[-chars:].split())


def run_step(step: Step, timeout_s: float, logs: Path) -> Result:
    """Run one step in a child python with a deadline; Stopped (SIGTERM) kills it and is re-raised."""
    logs.mkdir(parents=True, exist_ok=True)
    log, result_file = logs / f"{step.name}.log", logs / f"{step.name}.result.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.gpu_check", "--child", step.target, str(result_file)]
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            seconds = time.monotonic() - start
            return Result(step.name, "timeout", seconds, f"killed after {timeout_s:.1f} s", log=str(log))
        except BaseException:  # Stopped, KeyboardInterrupt: no step outlives the driver
            _kill_group(process)
            raise
    seconds = time.monotonic() - start
    if not result_file.exists():
        detail = f"exited with status {process.returncode} without a result"
        detail += f": {_log_tail(log)}" if _log_tail(log) else ""
        return Result(step.name, "FAIL", seconds, detail, log=str(log))
    outcome = json.loads(result_file.read_text())
    result_file.unlink()
    return Result(step.name, outcome["status"], seconds, outcome["detail"], outcome["data"], str(log))


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file); what JSON cannot hold is written as str."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str) + "\n")
    os.replace(partial, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_steps(steps: Sequence[Step], summary_path: Path, budget_s: float = BUDGET_S) -> list[Result]:
    """Run the steps in order, each under min(its timeout, what is left of `budget_s`), rewriting the summary
    after each. A step needing more GPUs than the last reported `gpus` is skipped without starting."""
    deadline = time.monotonic() + budget_s
    logs = summary_path.with_name(summary_path.stem + "-logs")
    summary: dict[str, Any] = {"started": _now(), "budget_s": budget_s, "complete": False, "steps": []}
    gpus, why = 0, "no step has reported the GPUs"
    results: list[Result] = []
    stopped = None
    for step in steps:
        summary["pending"] = [s.name for s in steps[len(results) + 1 :]]
        began = time.monotonic()
        left = deadline - began
        try:
            if stopped is not None:
                result = Result(step.name, "skip", 0.0, f"not run: {stopped}")
            elif step.gpus > gpus:
                need = f"needs {step.gpus} CUDA GPU{'s' if step.gpus > 1 else ''}"
                result = Result(step.name, "skip", 0.0, f"{need}; {why}")
            elif left < 1:
                result = Result(
                    step.name, "timeout", 0.0, f"not started: the run's {budget_s:.0f} s are spent"
                )
            else:
                timeout = min(step.timeout_s, left)
                print(
                    f"== {step.name} ({step.about or step.target}; at most {round(timeout, 1):g} s)",
                    flush=True,
                )
                result = run_step(step, timeout, logs)
        except (Stopped, KeyboardInterrupt) as stop:  # run_step has killed its child
            stopped = "the driver was stopped" + (" (SIGTERM)" if isinstance(stop, Stopped) else "")
            result = Result(step.name, "timeout", time.monotonic() - began, stopped)
        if "gpus" in result.data:
            gpus, why = int(result.data["gpus"]), str(result.data.get("why_no_cuda") or f"{gpus} here")
        results.append(result)
        print(f"   {step.name}: {result.status} in {result.seconds:.1f} s: {result.detail}", flush=True)
        summary["steps"].append(asdict(result))
        write_json(summary_path, summary)
    summary.update(complete=stopped is None, finished=_now(), pending=[])
    summary["failed"] = [r.step for r in results if r.status in ("FAIL", "timeout")]
    write_json(summary_path, summary)
    return results


def format_table(results: Sequence[Result], width: int = 110) -> str:
    rows = [("step", "status", "seconds", "detail")]
    rows += [(r.step, r.status, f"{r.seconds:.1f}", r.detail) for r in results]
    name = max(len(r[0]) for r in rows)
    lines = []
    for step, status, seconds, detail in rows:
        cut = detail if len(detail) <= width else detail[: width - 3] + "..."
        lines.append(f"{step:<{name}}  {status:<7}  {seconds:>7}  {cut}")
    return "\n".join(lines)


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def main(argv: Sequence[str] | None = None) -> int:
    steps = "\n".join(f"  {s.name:<13} {s.timeout_s:>4.0f} s  {s.gpus} GPU(s)  {s.about}" for s in STEPS)
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=f"steps (name, timeout, GPUs needed, what):\n{steps}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY, help="the JSON summary to write")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[s.name for s in STEPS],
        metavar="STEP",
        help="run these steps only (and versions, which finds the GPUs)",
    )
    parser.add_argument("--child", nargs=2, metavar=("TARGET", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # run by its module name, so a step's Skip and CheckFailed are the classes caught here
        from bench import gpu_check

        gpu_check.child_main(args.child[0], Path(args.child[1]))
        return 0
    signal.signal(signal.SIGTERM, _stop)
    steps = [s for s in STEPS if not args.only or s.name in args.only or s.gpus == 0]
    results = run_steps(steps, args.summary.resolve())
    print(f"\n{format_table(results)}\nsummary: {args.summary}", flush=True)
    return 1 if any(r.status in ("FAIL", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
