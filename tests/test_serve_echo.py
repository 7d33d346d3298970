"""glm-serve's prompts as token ids, echoed prompts scored (`echo` with `logprobs`, `max_tokens: 0`) and the
tokenizer endpoints, against the official openai client and raw HTTP on a live server with the bundled
model; the echoed prompt's log-probs against a plain causal forward pass of the same model in-process."""

from __future__ import annotations

import re

import openai
import pytest
import torch
from test_serve import MODEL, get, post, start_server, stop_server

from glm.api import load_from_args
from glm.cli.serve import build_parser

MAX_LENGTH = 256
PROMPT = "The quick brown fox jumps over the lazy dog near the river bank"
TOP = 3


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--groups", "2", "--width", "2", max_length=MAX_LENGTH)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def bundled():
    """The model and tokenizer the server loads (its default checkpoint)."""
    return load_from_args(build_parser().parse_args([]))


def complete(client, prompt, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, **{"temperature": 0, **kwargs})


def causal_logprobs(model, tokenizer, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 log-probs of the token at each index of `ids`, from one forward pass of
    `[gMASK] sop ids[:-1]` under a plain lower-triangular mask with linear positions: the docs' "causal
    after [gMASK]" written out without glm.scoring."""
    tokens = torch.tensor([[tokenizer.get_command("[gMASK]"), tokenizer.sop_id, *ids[:-1]]])
    length = tokens.shape[1]
    masked = ~torch.ones(length, length, dtype=torch.bool).tril()  # True = masked
    with torch.no_grad():
        logits = model(tokens, torch.arange(length)[None], masked[None, None])[0, 1:].float()
    return logits.log_softmax(-1)


# The server's and this fp32 computation differ only in the order of their sums (another batch layout and
# row count, so other kernel paths): 3e-6 relative measured on the bundled model here; 1e-4 (as
# test_serve_lm_eval.py allows) leaves room for other CPUs' vector widths. A wrong mask, position or
# target moves a log-prob by 1e-2 and more (abs: a floor for log-probs near 0).
def close(value: float) -> object:
    return pytest.approx(value, rel=1e-4, abs=1e-5)


def offsets(tokens: list[str], start: int = 0) -> list[int]:
    """Where each token starts in the joined texts."""
    ends = [start]
    for token in tokens:
        ends.append(ends[-1] + len(token))
    return ends[:-1]


def with_vocab(value, vocab: int):
    """`value` with each "vocab" in it replaced by `vocab` (the first id beyond the vocabulary)."""
    if isinstance(value, dict):
        return {k: with_vocab(v, vocab) for k, v in value.items()}
    if isinstance(value, list):
        return [with_vocab(v, vocab) for v in value]
    return vocab if value == "vocab" else value


def test_token_id_prompts_complete_as_their_text(client, bundled) -> None:
    _, tokenizer = bundled
    texts = ["The river", "Once upon a time there was"]
    kwargs = [{"max_tokens": 8}, {"max_tokens": 6, "temperature": 0.9, "seed": 5}]
    for text, options in zip(texts, kwargs, strict=True):
        as_text = complete(client, text, **options).choices[0].text
        as_ids = complete(client, tokenizer.tokenize(text), **options).choices[0].text
        assert as_ids == as_text
    # A list of prompts of token ids: one choice each, in order, each the prompt's completion alone.
    alone = [complete(client, t, max_tokens=8).choices[0].text for t in texts]
    both = complete(client, [tokenizer.tokenize(t) for t in texts], max_tokens=8)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == alone
    assert both.usage.prompt_tokens == sum(len(tokenizer.tokenize(t)) + 2 for t in texts)  # + gMASK, sop


def test_full_echo_scores_every_prompt_token_then_the_generated_ones(client, bundled) -> None:
    model, tokenizer = bundled
    ids = tokenizer.tokenize(PROMPT)
    assert tokenizer.detokenize(ids) == PROMPT  # the joined token texts can then be the echoed text
    echoed = complete(client, PROMPT, echo=True, logprobs=TOP, max_tokens=5).choices[0]
    plain = complete(client, PROMPT, logprobs=TOP, max_tokens=5).choices[0]
    lp, generated = echoed.logprobs, plain.logprobs
    n = len(ids)
    assert echoed.text == PROMPT + plain.text
    assert len(lp.tokens) == n + len(generated.tokens)
    assert "".join(lp.tokens) == echoed.text and lp.text_offset == offsets(lp.tokens)
    assert [tokenizer.detokenize([t]).strip() for t in ids] == [t.strip() for t in lp.tokens[:n]]

    # The prompt's tokens: the first unscored (nothing in the prompt predicts it), each other one scored
    # causally after [gMASK], with its TOP most likely alternatives.
    expected = causal_logprobs(model, tokenizer, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for k in range(1, n):
        assert lp.token_logprobs[k] == close(float(expected[k, ids[k]]))
        values, top_ids = expected[k].topk(TOP)
        want = {tokenizer.detokenize([t]): float(v) for t, v in zip(top_ids.tolist(), values, strict=True)}
        assert lp.top_logprobs[k].keys() == want.keys()
        for token, value in want.items():
            assert lp.top_logprobs[k][token] == close(value)

    # Then the generated tokens, as the same request without echo gives them, placed after the prompt.
    assert lp.tokens[n:] == generated.tokens and lp.top_logprobs[n:] == generated.top_logprobs
    assert lp.token_logprobs[n:] == generated.token_logprobs
    assert lp.text_offset[n:] == [len(PROMPT) + o for o in generated.text_offset]


def test_max_tokens_0_scores_the_prompt_alone(client, bundled) -> None:
    _, tokenizer = bundled
    ids = tokenizer.tokenize(PROMPT)
    full = complete(client, PROMPT, echo=True, logprobs=TOP, max_tokens=5).choices[0].logprobs
    zero = complete(client, PROMPT, echo=True, logprobs=TOP, max_tokens=0)
    (choice,) = zero.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert zero.usage.prompt_tokens == len(ids) and zero.usage.completion_tokens == 0
    lp = choice.logprobs
    n = len(ids)
    assert lp.tokens == full.tokens[:n] and lp.text_offset == full.text_offset[:n]
    # One scorer on the engine thread for both: the same row, alone in its batch each time.
    assert lp.token_logprobs == full.token_logprobs[:n] and lp.top_logprobs == full.top_logprobs[:n]

    # The same prompt as token ids, and two prompts at once (batched together on the engine thread): the
    # same numbers, rows batched with others only reorder float sums.
    other = "A short second prompt"
    both = complete(client, [ids, tokenizer.tokenize(other)], echo=True, logprobs=TOP, max_tokens=0)
    alone = complete(client, other, echo=True, logprobs=TOP, max_tokens=0).choices[0].logprobs
    assert [c.text for c in both.choices] == [PROMPT, other]
    for got, want in zip(both.choices, [lp, alone], strict=True):
        assert got.logprobs.tokens == want.tokens and got.logprobs.token_logprobs[0] is None
        assert got.logprobs.token_logprobs[1:] == pytest.approx(want.token_logprobs[1:], rel=1e-5)

    # A prompt holding [gMASK] (lm-eval's multiple-choice context): its tokens' texts add up to it too.
    masked = "Where is it?\nAnswer:[gMASK]Paris"
    lp = complete(client, masked, echo=True, logprobs=TOP, max_tokens=0).choices[0].logprobs
    assert "".join(lp.tokens) == masked and lp.text_offset == offsets(lp.tokens)
    cut = lp.tokens.index("[gMASK]") + 1  # the blank's answer is scored, its bidirectional context is not
    assert lp.token_logprobs[:cut] == [None] * cut and None not in lp.token_logprobs[cut:]
    assert "".join(lp.tokens[cut:]) == "Paris"

    for extra in ({}, {"echo": True, "stream": True}):
        with pytest.raises(openai.BadRequestError) as caught:
            complete(client, PROMPT, max_tokens=0, **extra)
        assert caught.value.body["param"] == "max_tokens" and "max_tokens" in caught.value.body["message"]


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param([-1], id="negative"),
        pytest.param([5, "vocab"], id="vocab-size"),
        pytest.param([[3, 4], [7, "vocab"]], id="second-prompt-beyond"),
        pytest.param([], id="empty"),
        pytest.param([[]], id="empty-inner"),
        pytest.param([3, "x"], id="mixed-types"),
        pytest.param([3, 1.5], id="float"),
        pytest.param([[3, [4]]], id="nested-too-deep"),
    ],
)
def test_bad_token_ids_are_400_naming_the_prompt(client, bundled, prompt) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, with_vocab(prompt, bundled[1].vocab_size), max_tokens=2)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == "prompt"
    assert "'prompt'" in error["message"] and "\n" not in error["message"]


def encode_alone(tokenizer, text: str) -> list[int]:
    """The ids of a text whose special tokens are masks or `[sop]` / `[eop]`, spelled out piece by piece."""
    commands = {"[sop]": tokenizer.sop_id, "[eop]": tokenizer.eop_id}
    ids: list[int] = []
    for piece in re.split(r"(\[sop\]|\[eop\])", text):
        ids += [commands[piece]] if piece in commands else tokenizer.tokenize_with_masks(piece)
    return ids


def test_tokenize_and_detokenize_round_trip(server, bundled) -> None:
    _, tokenizer = bundled
    text = "Hello world, the river flows [gMASK] to the sea."
    for flag in (False, True):
        reply = post(f"{server}/tokenize", {"prompt": text, "add_special_tokens": flag})
        assert reply.status_code == 200
        body = reply.json()
        assert body["tokens"] == tokenizer.tokenize_with_masks(text)  # no special token is added
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_LENGTH
    # Texts whose special tokens are written as a query writes them (no space beside a mask, which the
    # tokenizer gives to the blank): /detokenize gives them back, and /tokenize reads that as the same ids.
    for text in (PROMPT, "Where is it?\nAnswer:[gMASK]Paris", "A[MASK]b[sMASK]", "x[sop]y[eop]"):
        ids = post(f"{server}/tokenize", {"prompt": text}).json()["tokens"]
        assert ids == encode_alone(tokenizer, text)
        assert post(f"{server}/detokenize", {"tokens": ids}).json() == {"prompt": text}

    info = get(f"{server}/tokenizer_info").json()
    assert info["vocab_size"] == tokenizer.vocab_size and info["model_max_length"] == MAX_LENGTH
    # The names of the bos and eos tokens are texts /tokenize reads back as those tokens.
    for name, token in (("bos_token", tokenizer.sop_id), ("eos_token", tokenizer.eos_id)):
        assert post(f"{server}/tokenize", {"prompt": info[name]}).json()["tokens"] == [token]


@pytest.mark.parametrize(
    "route,body,param",
    [
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [3, "vocab"]}, "tokens"),
        ("/detokenize", {"tokens": [1.5]}, "tokens"),
    ],
)
def test_tokenizer_endpoints_bad_input_is_400_naming_the_field(server, bundled, route, body, param) -> None:
    reply = post(f"{server}{route}", with_vocab(body, bundled[1].vocab_size))
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and f"'{param}'" in error["message"]
