"""Launching: the command lines under torchrun (and ranks started by hand, as srun or MPI would) give what one
process gives; data-parallel and two-node evaluation; a lost rank ends the job with an error, not a hang."""

from __future__ import annotations

import datetime
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import free_port, launcher_env, run_ranks, subprocess_env

from glm import distributed

ROOT = Path(__file__).resolve().parent.parent
QUERIES = [
    "a\tTsinghua University is located in [MASK].",
    "b\tThe President said that the [MASK] of the United States is strong.",
    "c\t床前明月光，",
]
GENERATE = ["--out-seq-length", "48", "--with-id", "--seed", "7"]
TASKS = {
    "mc.yaml": """name: mc
type: mul
module: tasks.offline.blank.WrittenMaskMultiChoice
path: tasks/offline/zh_idiom_cloze
file_pattern: {test: "**/test.jsonl"}
metrics: [Accuracy]
max_seq_length: 256
micro_batch_size: 2
""",
    "gen.yaml": """name: gen
type: gen
module: tasks.lambada.task.LAMBADA
path: tasks/offline/en_lambada_cloze
file_pattern: {test: "**/test.jsonl"}
use_task_mask: true
sampling_strategy: BaseStrategy
max_gen_length: 4
max_seq_length: 256
micro_batch_size: 2
""",
    "lm.yaml": """name: lm
type: lm
path: tasks/offline/zh_lm
file_pattern: {test: "**/test.txt"}
use_task_mask: true
max_seq_length: 64
generation_length: 48
micro_batch_size: 2
""",
}
LIMIT = ["--limit", "5"]  # odd: the second replica's share is padded


def script(name: str, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """scripts/<name> with `env` (MP_SIZE=2: two ranks under torchrun)."""
    command = ["bash", str(ROOT / "scripts" / name), *args]
    done = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=180, env=subprocess_env(**env), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_here(module: str, argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> str:
    """The same command line in this process: the single-process reference."""
    import importlib
    import io

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).cli(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == 0, out.err
    return out.out


def files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_generate_sh_file_mode_under_torchrun_writes_what_one_process_writes(tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    flags = ["--input-source", str(queries), "--batch-size", "2", *GENERATE]
    run_here("glm.generate", [*flags, "--output-path", str(tmp_path / "one")], capsys)
    done = script("generate.sh", *flags, "--output-path", str(tmp_path / "two"), MP_SIZE="2")
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert len(files(tmp_path / "one")) == 3
    assert done.stdout.count("Input: ") == 3  # rank 0 alone prints


def test_generate_sh_interactive_under_torchrun_answers_as_one_process(tmp_path, capsys, monkeypatch):
    stdin = "\n".join(QUERIES[:2]) + "\nstop\n"
    run_here("glm.generate", [*GENERATE, "--output-path", str(tmp_path / "one")], capsys, stdin, monkeypatch)
    done = script("generate.sh", *GENERATE, "--output-path", str(tmp_path / "two"), stdin=stdin, MP_SIZE="2")
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert sorted(files(tmp_path / "one")) == ["a.txt", "b.txt"]
    assert done.stdout.count("Please Input Query") == 3  # rank 0 alone reads and prompts


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    for name, text in TASKS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def one_process(task_folder, tmp_path_factory) -> Path:
    """The evaluation in this process: the reference of the data-parallel runs."""
    import contextlib
    import io

    from glm.evaluate import cli

    output = tmp_path_factory.mktemp("one")
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        cli([str(task_folder), *LIMIT, "--save-predictions", "--output-dir", str(output)])
    assert exit_info.value.code == 0
    return output


def evaluation(folder: Path) -> tuple[list[dict], list[dict]]:
    (report,) = folder.glob("evaluate-*.json")
    (predictions,) = folder.glob("evaluate-*.predictions.jsonl")
    results = json.loads(report.read_text())
    assert results["complete"]
    return results["tasks"], [json.loads(line) for line in predictions.read_text().splitlines()]


def assert_same_evaluation(got: Path, expected: Path) -> None:
    """Same tasks, metrics, sample counts and predictions, record by record; the choices' summed log-probs
    may differ in the last bits (other batch mates, partial sums added in another order)."""
    got_tasks, got_records = evaluation(got)
    want_tasks, want_records = evaluation(expected)
    assert [t["name"] for t in got_tasks] == [t["name"] for t in want_tasks]
    for g, w in zip(got_tasks, want_tasks, strict=True):
        for group in w["groups"]:
            for file, result in w["groups"][group]["files"].items():
                got_result = g["groups"][group]["files"][file]
                assert got_result["samples"] == result["samples"] == 5
                assert got_result["metrics"] == pytest.approx(result["metrics"], rel=1e-5)
    assert len(got_records) == len(want_records)
    for g, w in zip(got_records, want_records, strict=True):
        for key in ("scores", "loss"):
            if key in w:
                assert g.pop(key) == pytest.approx(w.pop(key), abs=1e-4)
        assert g == w


def test_evaluation_dp2_x_tp2_gives_what_one_process_gives(task_folder, one_process, tmp_path):
    flags = [str(task_folder), *LIMIT, "--save-predictions"]
    done = script("evaluate.sh", *flags, "--output-dir", str(tmp_path / "four"), MP_SIZE="2", NPROC="4")
    assert_same_evaluation(tmp_path / "four", one_process)
    assert done.stdout.count("Finish task mc") == 1  # rank 0 alone reports


def test_evaluation_on_two_nodes_gives_what_one_process_gives(task_folder, one_process, tmp_path):
    """scripts/evaluate_multiple_node.sh started on two "nodes" (both 127.0.0.1), meeting through torchrun's
    c10d rendezvous: two data-parallel replicas of one process each."""
    env = subprocess_env(
        LAUNCHER="torchrun", NUM_WORKERS="2", NUM_GPUS_PER_WORKER="1", MP_SIZE="1", DEVICE="cpu",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RDZV_ID=uuid.uuid4().hex,
        LOG_DIR=str(tmp_path / "logs"),
    )  # fmt: skip
    command = ["bash", str(ROOT / "scripts" / "evaluate_multiple_node.sh"), str(task_folder), *LIMIT,
               "--save-predictions", "--output-dir", str(tmp_path / "nodes")]  # fmt: skip
    nodes = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=180)[0].decode() for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:]
    assert_same_evaluation(tmp_path / "nodes", one_process)
    assert sum("Finish task mc" in out for out in outputs) == 1  # rank 0 alone reports
    assert len(list((tmp_path / "logs").iterdir())) == 2  # one log per node, as the original's tee


def start_ranks(tmp_path: Path, timeout_s: float) -> list[subprocess.Popen]:
    """Two ranks of interactive generation started by hand (as srun or mpirun start them: no agent that
    would stop the others), rank 0 waiting at its prompt."""
    port = free_port()
    command = [sys.executable, "-m", "glm.generate", "--output-path", str(tmp_path),
               "--distributed-timeout", str(timeout_s)]  # fmt: skip
    ranks = [
        subprocess.Popen(
            command,
            env=subprocess_env(**launcher_env(rank, 2, port)),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    deadline, seen, out = time.monotonic() + 120, b"", ranks[0].stdout.fileno()
    while b"Please Input Query" not in seen:
        assert time.monotonic() < deadline, "rank 0 never prompted"
        assert ranks[0].poll() is None, ranks[0].stderr.read()
        if select.select([out], [], [], 0.2)[0]:
            seen += os.read(out, 65536)
    return ranks


def test_a_killed_rank_ends_the_other_with_an_error(tmp_path):
    ranks = start_ranks(tmp_path, timeout_s=600)
    try:
        ranks[0].send_signal(signal.SIGKILL)
        _, err = ranks[1].communicate(timeout=60)  # not the 600 s timeout: the peer's sockets closed
        assert ranks[1].returncode == 1
        assert "error: [rank 1] lost contact with another rank of the job" in err
    finally:
        for rank in ranks:
            rank.kill()


def test_a_hung_rank_ends_the_other_after_the_timeout(tmp_path):
    ranks = start_ranks(tmp_path, timeout_s=3)
    try:
        ranks[1].send_signal(signal.SIGSTOP)  # alive but silent
        ranks[0].stdin.write("Tsinghua University is located in [MASK].\n")
        ranks[0].stdin.flush()
        ranks[0].wait(timeout=60)
        err = ranks[0].stderr.read()
        assert ranks[0].returncode == 1
        assert (
            "error: lost contact with another rank of the job (it exited, or did not answer within 3 s" in err
        )
        assert not list(tmp_path.iterdir())  # nothing half-written
    finally:
        for rank in ranks:
            rank.kill()


# A rank that fails but stays alive (its exit waits on a pending NCCL collective; glm-serve's HTTP process
# outlives its engine thread) while the other waits in a collective with a long timeout.
FAILING_RANK = """
import argparse, os, sys, threading
import torch
import torch.distributed as dist
from glm import distributed

args = argparse.Namespace(tensor_parallel_size=2, device="cpu", distributed_timeout=600.0)
if os.environ["RANK"] == "1":
    try:
        with distributed.session(args):
            if sys.argv[1] == "thread":
                threading.Thread(target=distributed.stop_job, args=("the engine thread failed",)).start()
                threading.Event().wait()
            raise ValueError("bad input on rank 1")
    finally:
        threading.Event().wait()
with distributed.session(args):
    dist.all_reduce(torch.zeros(1), group=distributed.current().tensor_group)  # waits up to 600 s
"""


@pytest.mark.parametrize(
    ("how", "reason"),
    [("thread", "the engine thread failed"), ("session", "ValueError: bad input on rank 1")],
)
def test_a_failing_rank_that_stays_alive_ends_the_other_at_once(how, reason):
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", FAILING_RANK, how],
            env=subprocess_env(**launcher_env(rank, 2, port)),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        _, err = ranks[0].communicate(timeout=90)  # not the collective's 600 s
        assert ranks[0].returncode == 1, err
        assert f"error: rank 1 failed, so the job stops: {reason}" in err
        assert ranks[1].poll() is None  # rank 1 is still there: rank 0 did not learn of it by its exit
    finally:
        for rank in ranks:
            rank.kill()


def _strategy_fails_on_rank_0(rank: int) -> None:
    """A strategy that raises on rank 0 (the only rank that runs it) fails the step on both ranks, which
    then go on in step."""
    import torch

    class Flaky:
        num_beams, batch_size, is_done = 1, 1, False

        def __init__(self) -> None:
            self.calls = 0

        def forward(self, logits, tokens):
            self.calls += 1
            if self.calls == 1:
                raise ValueError("bad step")
            return torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=-1), None

        def finalize(self, tokens):
            raise ValueError("bad finalize")

    distributed.initialize(device="cpu")
    strategy = distributed.SynchronizedStrategy(Flaky(), distributed.current())
    logits, tokens = torch.tensor([[[0.0, 3.0, 1.0]]]), torch.tensor([[[5]]])
    expected = (ValueError, "bad step") if rank == 0 else (RuntimeError, "failed on tensor-parallel rank 0")
    with pytest.raises(expected[0], match=expected[1]):
        strategy.forward(logits, tokens)
    new_tokens, source = strategy.forward(logits, tokens)  # the next step is the same on both ranks
    assert new_tokens.tolist() == [[[5, 1]]] and source is None
    expected = (ValueError, "bad finalize") if rank == 0 else (RuntimeError, "rank 0: bad finalize")
    with pytest.raises(expected[0], match=expected[1]):
        strategy.finalize(new_tokens)
    assert distributed.broadcast_object(f"still in step on rank {rank}") == "still in step on rank 0"
    distributed.shutdown()


def test_a_strategy_failing_on_rank_0_fails_the_step_on_every_rank():
    run_ranks(_strategy_fails_on_rank_0, 2, timeout=120)


def test_nccl_binds_each_rank_to_its_gpu_with_the_users_timeout(monkeypatch):
    calls: dict = {}
    groups: list = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "new_group", lambda ranks, backend=None, timeout=None: groups.append(timeout))
    monkeypatch.setattr(distributed, "FailureWatch", lambda rank, timeout: None)
    monkeypatch.setattr(distributed, "_current", distributed.Parallel())
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # rank 1 sends its stdout to /dev/null
    for name, value in launcher_env(1, 2, free_port()).items():
        monkeypatch.setenv(name, value)
    distributed.initialize(2, None, "cuda", timeout_s=42.0)
    timeout = datetime.timedelta(seconds=42)
    assert calls == {
        "set_device": 1,
        "backend": "nccl",
        "rank": 1,
        "world_size": 2,
        "timeout": timeout,
        "device_id": torch.device("cuda", 1),
    }
    assert groups[0] == timeout  # the tensor-parallel group: the collectives inside the model


# -------------------------------------------------------------------------- pure helpers, no processes


def test_launcher_environments():
    assert distributed.launcher_env({}) == (0, 1, 0)
    torchrun_env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert distributed.launcher_env(torchrun_env) == (5, 8, 1)
    mpi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    assert distributed.launcher_env(mpi) == (3, 4, 3)
    with pytest.raises(ValueError, match="rank 4 is not in a world of 4"):
        distributed.launcher_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    ("world", "tp", "dp", "expected"),
    [
        (8, None, None, (8, 1)),
        (8, 2, None, (2, 4)),
        (8, None, 2, (4, 2)),
        (8, 4, 2, (4, 2)),
        (1, None, None, (1, 1)),
    ],
)
def test_sizes(world, tp, dp, expected):
    assert distributed.resolve_sizes(world, tp, dp) == expected


@pytest.mark.parametrize(
    ("world", "tp", "dp", "message"),
    [
        (1, 8, None, "--tensor-parallel-size 8 must divide the world size 1 .* torchrun --nproc-per-node 8"),
        (8, 3, None, "--tensor-parallel-size 3 must divide the world size 8"),
        (8, 2, 2, "data-parallel 2 x tensor-parallel 2 is not the world size 8"),
    ],
)
def test_sizes_that_do_not_fit_the_world(world, tp, dp, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_sizes(world, tp, dp)


def test_data_parallel_shares_and_their_gather_restore_the_order(monkeypatch):
    """Seven items over three replicas as the original's DistributedSampler deals them (padded by
    repetition to 9), and the order rebuilt from the replicas' results with the padding dropped."""
    items = list("abcdefg")
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_current", distributed.Parallel(rank=rank, world_size=3))
        shares.append(distributed.data_parallel_share(items))
    assert shares == [["a", "d", "g"], ["b", "e", "a"], ["c", "f", "b"]]

    def all_gather_object(output, value, group=None):
        output[:] = [[x.upper() for x in share] for share in shares]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert distributed.gather_data_parallel(["?"] * 3, len(items)) == list("ABCDEFG")
