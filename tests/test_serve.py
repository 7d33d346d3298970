"""glm-serve against the official openai client and raw HTTP: a live server on 127.0.0.1 with the bundled
model (completions, streaming, stop, seed, n, logprobs, echo, 16 concurrent clients each equal to its answer
alone), errors (400 naming the field, 401, 404, 429 when the queue is full), a client disconnecting
mid-stream, and SIGTERM letting an in-flight request finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "glm-bilingual"


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.body = status, body

    def json(self):
        return json.loads(self.body)


def http(method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None, timeout=120):
    """One plain HTTP request (the standard library's client); the connection and its response."""
    parts = urlsplit(url)
    connection = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(
        method, parts.path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    return connection, connection.getresponse()


def post(url: str, body: dict | bytes, headers: dict | None = None, timeout=120) -> Reply:
    connection, response = http("POST", url, body, headers, timeout)
    try:
        return Reply(response.status, response.read())
    finally:
        connection.close()


def get(url: str) -> Reply:
    connection, response = http("GET", url, timeout=5)
    try:
        return Reply(response.status, response.read())
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, max_length: int = 128) -> tuple[subprocess.Popen, str]:
    port = free_port()
    serve = [sys.executable, "-m", "glm.serve", "--port", str(port)]
    command = [*serve, "--max-length", str(max_length), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"glm-serve exited: {process.stderr.read()}")
        try:
            if get(f"{url}/health").status_code == 200:
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("glm-serve did not start in 120 s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--groups", "4", "--width", "4", "--api-key", "sesame")
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="sesame", max_retries=0, timeout=120)


def complete(client, prompt: str, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 8, **kwargs})


def test_models_and_greedy_completion(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    answer = complete(client, "Tsinghua University is located in [MASK].", temperature=0)
    (choice,) = answer.choices
    # The model card's recorded infill of this query (README): the bundled model's greedy blank.
    assert choice.text == "the document" and choice.finish_reason == "stop"
    assert answer.usage.completion_tokens == 2 and answer.usage.total_tokens == answer.usage.prompt_tokens + 2


def test_streaming_adds_up_to_the_completion(client):
    kwargs = {"temperature": 0.9, "seed": 7, "max_tokens": 12}
    whole = complete(client, "The river", **kwargs).choices[0]
    pieces = list(complete(client, "The river", stream=True, **kwargs))
    assert len(pieces) > 2  # token by token, not one chunk
    assert "".join(p.choices[0].text for p in pieces) == whole.text
    assert pieces[-1].choices[0].finish_reason == whole.finish_reason


def test_seed_reproduces_and_n_gives_distinct_samples(client):
    kwargs = {"temperature": 1.0, "seed": 1234, "n": 3, "max_tokens": 10}
    first = complete(client, "It is a truth universally acknowledged", **kwargs)
    again = complete(client, "It is a truth universally acknowledged", **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1
    other = complete(client, "It is a truth universally acknowledged", **{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_stop_string_and_echo(client):
    prompt = "The President said that"
    plain = complete(client, prompt, temperature=0, max_tokens=12).choices[0].text
    stop = plain.strip().split(" ")[1]  # the second word of the greedy answer
    cut = complete(client, prompt, temperature=0, max_tokens=12, stop=[stop, "zzz"]).choices[0]
    assert cut.text == plain[: plain.find(stop)] and cut.finish_reason == "stop"
    echoed = complete(client, prompt, temperature=0, max_tokens=12, echo=True).choices[0]
    assert echoed.text == prompt + plain


def test_logprobs_are_the_models_distribution(client):
    choice = complete(
        client, "The capital of France is [MASK].", temperature=0, logprobs=3, max_tokens=4
    ).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value == pytest.approx(max(top.values()))  # greedy picks the top token
        assert all(v <= 0 for v in top.values())


def test_sixteen_concurrent_clients_each_get_their_answer_alone(client):
    prompts = [f"Sample {i}: the weather [MASK] today." if i % 2 else f"Story {i} begins" for i in range(16)]
    kwargs = [{"seed": i, "temperature": 0.8 if i % 3 else 0, "max_tokens": 6 + i % 5} for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(lambda i: complete(client, prompts[i], **kwargs[i]).choices[0].text, range(16))
        )
    alone = [complete(client, prompts[i], **kwargs[i]).choices[0].text for i in range(16)]
    assert together == alone


def test_native_fill_returns_every_blank(server):
    response = post(
        f"{server}/v1/fill",
        {"prompt": "The [MASK] is in [MASK].", "temperature": 0, "max_tokens": 6},
        {"Authorization": "Bearer sesame"},
    )
    body = response.json()
    assert response.status_code == 200 and len(body["blanks"]) == 2
    text = body["text"]
    assert text.startswith("The ") and all(blank in text for blank in body["blanks"])


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": 5}, "n"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x " * 200, "max_tokens": 8}, "max_tokens"),
    ],
)
def test_bad_values_are_400_naming_the_field(server, body, param):
    response = post(f"{server}/v1/completions", body, {"Authorization": "Bearer sesame"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_malformed_json_wrong_key_and_unknown_model(server):
    auth = {"Authorization": "Bearer sesame"}
    response = post(f"{server}/v1/completions", b'{"prompt": ', auth)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = post(f"{server}/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer no"})
    assert response.status_code == 401
    response = post(f"{server}/v1/completions", {"prompt": "x", "model": "gpt-4"}, auth)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


@pytest.fixture(scope="module")
def small_server():
    """One row and a queue of one: the second waiting request is refused."""
    process, url = start_server("--groups", "1", "--width", "1", "--max-queue", "1", max_length=1024)
    yield process, url
    stop_server(process)


def stream_lines(url: str, body: dict):
    """The lines of a streamed completion; closing the generator closes the connection."""
    connection, response = http("POST", f"{url}/v1/completions", {**body, "stream": True})
    try:
        assert response.status == 200
        for line in response:
            yield line.decode().rstrip("\n")
    finally:
        connection.close()


def wait_for_health(url: str, **state: int) -> None:
    """Poll /health until it shows `state` (a deadline, not a sleep, decides)."""
    deadline = time.monotonic() + 60
    while (health := get(f"{url}/health").json()) | state != health:
        assert time.monotonic() < deadline, f"/health never showed {state}: {health}"


# A budget far beyond any wait of these tests: the request is running until the client goes away.
LONG = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}


def test_queue_full_429_and_disconnect_frees_the_row(small_server):
    _, url = small_server
    lines = stream_lines(url, {**LONG, "seed": 1})
    first = next(line for line in lines if line.startswith("data: "))  # the row is taken
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, f"{url}/v1/completions", {"prompt": "a", "max_tokens": 2})
        wait_for_health(url, running=1, waiting=1)  # it now waits in the queue
        refused = post(f"{url}/v1/completions", {"prompt": "b", "max_tokens": 2})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        lines.close()  # the client goes away mid-stream: its row is freed for the waiting request
        assert waiting.result(timeout=60).status_code == 200
    health = get(f"{url}/health").json()
    assert health == {"status": "ok", "running": 0, "waiting": 0}


def test_sigterm_finishes_the_request_in_flight(small_server):
    process, url = small_server
    lines = stream_lines(url, {**LONG, "max_tokens": 200, "seed": 2})
    next(line for line in lines if line.startswith("data: "))
    wait_for_health(url, running=1)  # in flight when the signal comes
    process.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal once it has shut down gracefully
    assert process.wait(30) in (0, -signal.SIGTERM)
