"""The prepared GPU check (bench/gpu_check.sh): its dry run on this machine, and the driver's handling of
steps that time out, fail or skip (fake steps below, run by the driver in child pythons)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.gpu_check import STEPS, CheckFailed, Skip, Step, format_table, run_steps

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# Fake steps, imported by the driver's child python as test_gpu_check:<name>.
def never_returns() -> dict:
    threading.Event().wait()  # nothing sets it
    return {"detail": "unreachable"}


def quick() -> dict:
    return {"detail": "done", "answer": 42}


def fails() -> dict:
    raise CheckFailed("1 != 2", {"got": 1})


def skips() -> dict:
    raise Skip("not on this machine")


def crashes() -> dict:
    os._exit(3)


def peeks() -> dict:
    """What the summary holds while this step runs."""
    written = json.loads(Path(os.environ["TEST_GPU_CHECK_SUMMARY"]).read_text())
    return {"detail": "peeked", "seen": [(s["step"], s["status"]) for s in written["steps"]]}


def test_the_dry_run_skips_every_gpu_step_with_a_reason_and_exits_0(tmp_path):
    import torch  # here, not at the top: the fake steps' child pythons import this module

    if torch.cuda.is_available():
        pytest.skip("the dry run is what a machine without CUDA does")
    summary = tmp_path / "s.json"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--summary", str(summary)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    written = json.loads(summary.read_text())
    assert written["complete"] and written["failed"] == []
    steps = {s["step"]: s for s in written["steps"]}
    assert list(steps) == [s.name for s in STEPS]
    assert steps.pop("versions")["status"] == "ok"
    for name, step in steps.items():
        assert step["status"] == "skip", name
        assert "CUDA" in step["detail"], name  # the reason: no CUDA here
    table = run.stdout[run.stdout.index("\nstep ") + 1 :].splitlines()
    assert table[0].split() == ["step", "status", "seconds", "detail"]
    assert [line.split()[:2] for line in table[1 : len(STEPS) + 1]] == [
        [s["step"], s["status"]] for s in written["steps"]
    ]


def test_a_step_past_its_timeout_is_recorded_and_the_later_steps_still_run(tmp_path, monkeypatch):
    summary = tmp_path / "s.json"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("TEST_GPU_CHECK_SUMMARY", str(summary))
    steps = [
        Step("blocks", "test_gpu_check:never_returns", timeout_s=1.5, gpus=0),
        Step("quick", "test_gpu_check:quick", timeout_s=120, gpus=0),
        Step("peeks", "test_gpu_check:peeks", timeout_s=120, gpus=0),
        Step("fails", "test_gpu_check:fails", timeout_s=120, gpus=0),
        Step("skips", "test_gpu_check:skips", timeout_s=120, gpus=0),
        Step("crashes", "test_gpu_check:crashes", timeout_s=120, gpus=0),
        Step("needs-a-gpu", "test_gpu_check:quick", timeout_s=120, gpus=1),
    ]
    results = run_steps(steps, summary)

    assert [r.status for r in results] == ["timeout", "ok", "ok", "FAIL", "skip", "FAIL", "skip"]
    blocked, done, peeked, failed, skipped, crashed, gated = results
    assert blocked.detail == "killed after 1.5 s" and blocked.seconds >= 1.5
    assert (done.detail, done.data) == ("done", {"answer": 42})
    # the summary on disk already held the finished steps while the next one ran
    assert peeked.data == {"seen": [["blocks", "timeout"], ["quick", "ok"]]}
    assert (failed.detail, failed.data) == ("1 != 2", {"got": 1})
    assert skipped.detail == "not on this machine"
    assert crashed.detail.startswith("exited with status 3 without a result")
    assert gated.detail.startswith("needs 1 CUDA GPU;") and gated.log is None  # not started
    written = json.loads(summary.read_text())
    assert [(s["step"], s["status"]) for s in written["steps"]] == [(r.step, r.status) for r in results]
    assert written["complete"] and written["failed"] == ["blocks", "fails", "crashes"]
    assert format_table(results).splitlines()[1].split()[:2] == ["blocks", "timeout"]


def test_the_budget_caps_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    steps = [
        Step("blocks", "test_gpu_check:never_returns", timeout_s=600, gpus=0),
        Step("quick", "test_gpu_check:quick", timeout_s=600, gpus=0),
    ]
    blocked, after = run_steps(steps, tmp_path / "s.json", budget_s=1.5)
    assert blocked.status == "timeout" and blocked.detail.startswith("killed after")  # not after 600 s
    assert after.status == "timeout" and "not started" in after.detail
