"""glm-serve under tensor parallelism (2 ranks, gloo, launched by torchrun): rank 0 serves HTTP and every
rank runs the same steps; answers equal the single-process engine's, for greedy, beam search and seeded
sampling in one concurrent batch."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from glm.api import load
from glm.decoding.engine import Engine
from glm.decoding.infill import prepare_query
from glm.serve.protocol import parse_params
from glm.serve.service import Service
from tests.test_serve import MODEL, ROOT, free_port, get, post

CASES = [
    ("Tsinghua University is located in [MASK].", {"temperature": 0, "max_tokens": 8}),
    ("The river", {"temperature": 0, "num_beams": 3, "max_tokens": 8}),
    ("It is a truth universally acknowledged", {"temperature": 0.8, "seed": 5, "max_tokens": 10}),
]


def single_process_answers() -> list[str]:
    model, tokenizer = load()
    engine = Engine(model, groups=4, width=4, max_length=128, detokenize=tokenizer.detokenize)
    service = Service(engine, tokenizer, MODEL)
    answers = []
    for prompt, body in CASES:
        params = parse_params(body, 4, 128)
        query = prepare_query(prompt, tokenizer)
        position = None if query.use_gmask else query.ids.index(query.mask_id)
        request = service.make_request(
            query.ids, position, params, params["max_tokens"], None, lambda r: None
        )
        (request,) = engine.run([request])
        answers.append(tokenizer.detokenize(request.outputs[0].ids))
    return answers


def alive(group: int) -> bool:
    """Whether a process of process group `group` is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def start_tp_server(program: list[str], **popen) -> tuple[subprocess.Popen, str]:
    """glm-serve's `program` (after python) under torchrun on 2 ranks, once it answers /health."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-port", str(free_port())]
    command = [*launcher, *program, "--port", str(port), "--max-length", "128"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if get(f"{url}/health").status_code == 200:
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                raise RuntimeError("the tensor-parallel glm-serve did not start") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def tp_server():
    process, url = start_tp_server(["-m", "glm.serve"])
    yield process, url
    with contextlib.suppress(ProcessLookupError):  # whatever is left of the job
        os.killpg(process.pid, signal.SIGKILL)


def test_tensor_parallel_server_answers_as_one_process(tp_server):
    process, url = tp_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

    def ask(case):
        prompt, body = case
        extra = {k: v for k, v in body.items() if k == "num_beams"}  # glm-serve's own fields
        known = {k: v for k, v in body.items() if k not in extra}
        return (
            client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **known).choices[0].text
        )

    with ThreadPoolExecutor(len(CASES)) as pool:  # one batch over both ranks
        answers = list(pool.map(ask, CASES))
    assert answers == single_process_answers()
    os.killpg(process.pid, signal.SIGTERM)  # as a service manager stops the job: every process
    process.wait(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and alive(process.pid):
        time.sleep(0.5)
    assert not alive(process.pid), "ranks left running after SIGTERM"


# glm-serve whose decode step fails on rank 0 alone (as an out-of-memory error there would): rank 1, which
# has the same plan, then waits inside the step's first collective for a rank 0 that never comes.
FAILING_SERVER = """
import os
import sys

from glm.decoding.engine import Engine
from glm.serve import cli

def step(self):
    raise RuntimeError("injected fault on rank 0")

if os.environ["RANK"] == "0":
    Engine.step = step
sys.argv[0] = "glm-serve"
cli()
"""


def test_a_step_failing_on_rank_0_fails_the_request_and_stops_every_rank(tmp_path):
    script, log = tmp_path / "failing_server.py", tmp_path / "stderr.txt"
    script.write_text(FAILING_SERVER)
    with log.open("w") as stderr:
        process, url = start_tp_server([str(script)], stderr=stderr)
    try:
        reply = post(f"{url}/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 4})
        assert reply.status_code == 500 and "injected fault on rank 0" in reply.json()["error"]["message"]
        process.wait(timeout=60)  # not the 600 s of --distributed-timeout
        err = log.read_text()
        assert process.returncode != 0
        stopped = "error: [rank 1] rank 0 failed, so the job stops: the engine failed: RuntimeError"
        assert f"{stopped}: injected fault on rank 0" in err
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and alive(process.pid):
            time.sleep(0.5)
        assert not alive(process.pid), "ranks left running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
