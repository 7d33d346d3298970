"""Every entry point, run as a user runs it, in the environment the README's first command installs.

`.ci/run` calls this inside a fresh virtual environment holding only the runtime dependencies (no dev
extras: no numpy, no pytest), so a module that needs an undeclared package fails here as it would for a new
user. Each step is a real process with a timeout and an assertion on its output; no start-up warning may
reach stderr. Standard library only. Usage: python .ci/smoke.py [WORKDIR]
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from http.client import HTTPConnection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ["Tsinghua University is located in [MASK].", "北京是中国的[MASK]。", "Once upon a time [gMASK]"]
GREEDY = ["--sampling-strategy", "BaseStrategy", "--top_k", "1", "--out-seq-length", "32"]
BEAM = ["--sampling-strategy", "BeamSearchStrategy", "--num-beams", "2", "--deterministic"]
BEAM += ["--out-seq-length", "32"]


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run one step; fail with its output if it exits non-zero or warns at start-up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    assert_no_warning(command, result.stderr)
    return result


def assert_no_warning(command: list[str], stderr: str) -> None:
    warnings = [line for line in stderr.splitlines() if "Warning" in line or "warning:" in line.lower()]
    if warnings:
        raise AssertionError(f"{' '.join(command)} warned on stderr:\n" + "\n".join(warnings))


def answers(folder: Path) -> list[str]:
    """The output files' texts, sorted (file mode names each file by its query's first characters)."""
    return sorted(path.read_text() for path in folder.iterdir())


def generate(work: Path) -> None:
    queries = work / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    for name, flags in (("greedy", GREEDY), ("beam", BEAM)):
        one = work / f"{name}-tp1"
        run(
            [
                "bash",
                "scripts/generate.sh",
                "--input-source",
                str(queries),
                "--output-path",
                str(one),
                *flags,
            ],
            300,
        )
        got = answers(one)
        assert len(got) == len(QUERIES), (name, got)
        if name == "greedy":
            # The recorded greedy infill of this query (README: the bundled model).
            assert any("Tsinghua University is located in the document." in text for text in got), got
        two = work / f"{name}-tp2"  # torchrun --nproc-per-node 2 -m glm.generate --tensor-parallel-size 2
        command = ["bash", "scripts/generate.sh", "--input-source", str(queries), "--output-path", str(two)]
        run([*command, *flags], 400, env={"MP_SIZE": "2"})
        assert answers(two) == got, f"{name}: TP 2 answered otherwise than one process"


def evaluate(work: Path) -> None:
    out = work / "evaluation"
    task = "tasks/offline/en_mmlu.yaml"
    run(["bash", "scripts/evaluate.sh", task, "--limit", "16", "--output-dir", str(out)], 300)
    (report,) = out.glob("evaluate-*.json")
    data = json.loads(report.read_text())
    (result,) = data["tasks"]
    scored = result["groups"]["test"]["files"]["test.jsonl"]
    assert data["status"] == "complete" and scored["samples"] == 16, scored
    assert 0 <= scored["metrics"]["Accuracy"] <= 100, scored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> tuple[int, str]:
    connection = HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def serve(work: Path) -> None:
    port = free_port()
    command = ["glm-serve", "--port", str(port), "--max-length", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr = (work / "serve.stderr").open("w+")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"glm-serve exited {server.returncode}"
            try:
                connection = HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "glm-serve did not answer /health in 120 s"
                time.sleep(0.2)  # a poll with a deadline: how soon it answers decides nothing
        query = {"prompt": QUERIES[0], "max_tokens": 8, "temperature": 0}
        status, body = post(port, query)
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"] == "the document", body
        status, body = post(port, {**query, "stream": True})
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]", body
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert streamed == "the document", body
        for path, words in (("/", "GLM playground"), ("/playground/playground.js", "function run")):
            connection = HTTPConnection("127.0.0.1", port, timeout=5)  # the page ships with the package
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200 and words in response.read().decode(), path
            connection.close()
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    stderr.seek(0)
    log = stderr.read()
    assert code in (0, -signal.SIGTERM), f"glm-serve exited {code} after SIGTERM:\n{log[-3000:]}"
    assert_no_warning(command, log)


def convert(work: Path) -> None:
    source = ROOT / "models" / "glm-bilingual"
    two, one = work / "tp2", work / "tp1"
    tool = [sys.executable, "tools/convert_tp.py"]
    run([*tool, "--input-folder", str(source), "--output-folder", str(two), "--target-tp", "2"], 300)
    run([*tool, "--input-folder", str(two), "--output-folder", str(one), "--target-tp", "1"], 300)
    tag = (source / "latest").read_text().strip()
    for shard in (source / tag).iterdir():
        assert filecmp.cmp(shard, one / tag / shard.name, shallow=False), (
            f"{shard.name} differs after 1 -> 2 -> 1"
        )


def plan(_: Path) -> None:
    result = run([sys.executable, "-m", "glm.plan", "--config", "glm-130b"], 120)
    assert "weights total          32.18 GB" in result.stdout, result.stdout  # 130 B params x 2 bytes / TP 8


STEPS = [generate, evaluate, serve, convert, plan]


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        for step in STEPS:
            work = Path(folder) / step.__name__
            work.mkdir()
            start = time.monotonic()
            try:
                step(work)
            except (AssertionError, subprocess.TimeoutExpired) as e:
                print(f"smoke {step.__name__}: FAILED\n{e}", file=sys.stderr)
                return 1
            print(f"smoke {step.__name__}: ok ({time.monotonic() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
