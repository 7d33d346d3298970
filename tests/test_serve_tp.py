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
from tests.test_serve import MODEL, ROOT, free_port, get

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


@pytest.fixture(scope="module")
def tp_server():
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-port", str(free_port())]
    command = [*launcher, "-m", "glm.serve", "--port", str(port), "--max-length", "128"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    process = subprocess.Popen(command, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if get(f"{url}/health").status_code == 200:
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                raise RuntimeError("the tensor-parallel glm-serve did not start") from None
            time.sleep(0.5)
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
