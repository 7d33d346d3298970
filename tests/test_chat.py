"""POST /v1/chat/completions against the official openai client on a live glm-serve (tests/conftest.py's
live_server): the documented template, each answer equal to the completion of its template's prompt,
streamed deltas adding up to the whole answer, log-probs, n, errors naming the field; and the playground's
limits equal to the bounds the server enforces."""

from __future__ import annotations

import openai
import pytest
from test_serve import MODEL, get

from glm.serve.chat import TURN, chat_prompt, parse_chat
from glm.serve.playground import limits
from glm.serve.protocol import BadRequest, parse_params

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Where is Tsinghua University?"},
    {"role": "assistant", "content": "It is in Beijing."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "And Peking "}, {"type": "text", "text": "University?"}],
    },
]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_template_of_a_conversation():
    assert chat_prompt(CONVERSATION) == (
        "You answer in one short sentence.\n\n"
        "User: Where is Tsinghua University?\n"
        "Assistant: It is in Beijing.\n"
        "User: And Peking University?\n"
        "Assistant: [gMASK]"
    )
    assert chat_prompt([{"role": "user", "content": " 你好 "}]) == "User: 你好\nAssistant: [gMASK]"


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({}, "messages", "non-empty list"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content"),
        ({"messages": [{"role": "system", "content": "be brief"}]}, "messages", "role 'user'"),
        ({"messages": [{"role": "user", "content": "The [MASK] is"}]}, "messages", "/v1/completions"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 2}, "logprobs", "true or false"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", "needs"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature", "between"),
    ],
)
def test_bad_chat_requests_name_the_field(body, param, words):
    with pytest.raises(BadRequest) as caught:
        parse_chat(body, width=2, max_length=128)
    assert caught.value.param == param and words in caught.value.message


def test_the_turn_marker_is_a_stop_string_beside_the_requests_own():
    _, params = parse_chat({"messages": CONVERSATION, "stop": "."}, width=2, max_length=128)
    assert params["stop"] == (".", TURN)


def test_models_unchanged_and_chat_answer_is_the_completion_of_its_template(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    for messages in (CONVERSATION[1:2], CONVERSATION):
        chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
        plain = client.completions.create(
            model=MODEL, prompt=chat_prompt(messages), temperature=0, max_tokens=16, stop=[TURN]
        ).choices[0]
        (choice,) = chat.choices
        assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
        assert choice.message.role == "assistant" and choice.message.content == plain.text
        assert choice.finish_reason == plain.finish_reason
        assert chat.usage.completion_tokens > 0


def test_streamed_deltas_add_up_to_the_answer(client):
    kwargs = {"model": MODEL, "messages": CONVERSATION, "temperature": 0.9, "seed": 11, "max_tokens": 12}
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert len(chunks) > 2 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_logprobs_and_n(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=CONVERSATION[1:2], temperature=0, max_tokens=6, logprobs=True, top_logprobs=2
    ).choices[0]
    content = answer.logprobs.content
    assert "".join(t.token for t in content) == answer.message.content
    for token in content:  # greedy takes the most likely token
        assert len(token.top_logprobs) == 2
        assert token.logprob == pytest.approx(max(t.logprob for t in token.top_logprobs))
    samples = client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, temperature=1.0, seed=3, n=2, max_tokens=8
    )
    assert [c.index for c in samples.choices] == [0, 1]


def test_errors_reach_the_openai_client(client, live_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert "max_tokens" in caught.value.message
    assert get(f"{live_server}/health").json()["running"] == 0


def test_playground_limits_are_the_bounds_the_server_enforces(live_server):
    served = get(f"{live_server}/playground/limits").json()
    assert served["model"] == MODEL and served["limits"] == limits(3, 512)
    for name, (low, high) in limits(width=3, max_length=512).items():
        if name == "stop":
            parse_params({"stop": ["a"] * high}, 3, 512)
            with pytest.raises(BadRequest):
                parse_params({"stop": ["a"] * (high + 1)}, 3, 512)
            continue
        step = 1 if isinstance(high, int) else 0.5
        for value in (low, high):
            parse_params({name: value}, 3, 512)  # the bounds are accepted ...
        for value in (low - step, high + step):  # ... and a step beyond them is refused, naming the field
            with pytest.raises(BadRequest) as caught:
                parse_params({name: value}, 3, 512)
            assert caught.value.param == name


def test_beam_search_returns_the_n_best_beams(client):
    """The completions extra the playground shows side by side: n (at most num_beams) best beams."""
    kwargs = {"model": MODEL, "prompt": "The [MASK] is in Beijing.", "temperature": 0, "max_tokens": 6}
    best = client.completions.create(extra_body={"num_beams": 3}, **kwargs).choices
    three = client.completions.create(n=3, extra_body={"num_beams": 3}, **kwargs).choices
    assert len(best) == 1 and [c.index for c in three] == [0, 1, 2]
    assert three[0].text == best[0].text and len({c.text for c in three}) == 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(n=3, extra_body={"num_beams": 2}, **kwargs)
    assert "at most num_beams" in caught.value.message
