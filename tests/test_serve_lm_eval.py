"""lm-evaluation-harness's `local-completions` (tokenizer_backend=remote) against a live glm-serve on
127.0.0.1, with the local task YAMLs of tests/lm_eval_tasks/ (offline: no hub, local data files):
generate_until answers are the server's greedy answers; multiple-choice log-likelihoods and accuracy are
the in-process glm/lm_eval_adapter.py's; loglikelihood_rolling word perplexity is the evaluator's `lm`
task perplexity; 4 concurrent requests give the numbers of one at a time."""

from __future__ import annotations

import os

import openai
import pytest
from test_serve import MODEL, ROOT, start_server, stop_server

from glm.api import load_from_args
from glm.cli.serve import build_parser
from glm.evaluation.config import config_from_dict
from glm.evaluation.tasks import LanguageModelTask
from glm.lm_eval_adapter import make_lm_class

TASKS = ROOT / "tests" / "lm_eval_tasks"
ITEMS = 6  # MMLU items per multiple-choice or generation run (4 choices each)
SHORT_TEXT = TASKS / "data" / "short.txt"


@pytest.fixture(scope="module")
def server():
    process, url = start_server("--groups", "4", "--width", "1", max_length=1024)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def bundled():
    """The model and tokenizer the server loads (its default checkpoint)."""
    return load_from_args(build_parser().parse_args([]))


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files from the repository root


def evaluate(lm, task: str, limit: int | None = None, **model_args) -> dict:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"  # before lm_eval imports datasets, which reads them once
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm,
        model_args=model_args or None,
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS)),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )


def served(url: str, task: str, limit: int | None = None, concurrent: int = 1) -> dict:
    return evaluate(
        "local-completions",
        task,
        limit,
        base_url=f"{url}/v1/completions",
        model=MODEL,
        tokenizer_backend="remote",
        num_concurrent=concurrent,
        max_retries=1,
    )


def loglikelihoods(result: dict, task: str) -> dict[int, list[float]]:
    """Each document's log-likelihood of each choice."""
    return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in result["samples"][task]}


@pytest.fixture(scope="module")
def choice_runs(server) -> dict[str, dict]:
    return {
        "one at a time": served(server, "glm_mmlu_choice", ITEMS),
        "4 concurrent": served(server, "glm_mmlu_choice", ITEMS, concurrent=4),
    }


def test_generate_until_answers_are_the_servers_greedy_answers(server) -> None:
    result = served(server, "glm_mmlu_greedy", ITEMS)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    samples = result["samples"]["glm_mmlu_greedy"]
    assert len(samples) == ITEMS
    for sample in samples:
        context = sample["doc"]["inputs_pretokenized"] + "\nAnswer:"
        answer = client.completions.create(
            model=MODEL, prompt=context, max_tokens=8, temperature=0, stop=["\n"]
        )
        assert sample["resps"][0][0] == answer.choices[0].text


def test_multiple_choice_equals_the_in_process_adapter(choice_runs, bundled) -> None:
    model, tokenizer = bundled
    local = evaluate(make_lm_class()(model, tokenizer), "glm_mmlu_choice", ITEMS)
    task = "glm_mmlu_choice"
    served_scores, local_scores = (
        loglikelihoods(choice_runs["one at a time"], task),
        loglikelihoods(local, task),
    )
    assert sorted(served_scores) == sorted(local_scores) == list(range(ITEMS))
    for doc in local_scores:  # one row per choice (server) vs one packed row per item (adapter)
        assert served_scores[doc] == pytest.approx(local_scores[doc], rel=1e-4)
    acc = choice_runs["one at a time"]["results"][task]["acc,none"]
    assert acc == local["results"][task]["acc,none"]


def test_concurrent_requests_give_the_numbers_of_one_at_a_time(choice_runs) -> None:
    task = "glm_mmlu_choice"
    alone, together = (loglikelihoods(choice_runs[k], task) for k in ("one at a time", "4 concurrent"))
    assert sorted(alone) == sorted(together)
    for doc in alone:  # rows batched with other requests' rows: only float summation order may differ
        assert together[doc] == pytest.approx(alone[doc], rel=1e-5)


def test_rolling_word_perplexity_equals_the_evaluators_lm_task(server, bundled) -> None:
    model, tokenizer = bundled
    text = SHORT_TEXT.read_text(encoding="utf-8")
    assert len(tokenizer.tokenize(text)) < 255  # one window for both: the evaluator's 256 - 1 tokens
    config = config_from_dict(
        dict(
            name="short",
            type="lm",
            path="tests/lm_eval_tasks/data",
            file_pattern="short.txt",
            use_task_mask=True,
            max_seq_length=256,
            generation_length=128,
        )
    )
    metrics, _ = LanguageModelTask(model, tokenizer, config, ROOT).evaluate().groups["all"]["short.txt"]
    result = served(server, "glm_short_text")
    assert result["results"]["glm_short_text"]["word_perplexity,none"] == pytest.approx(
        metrics["PPL"], rel=1e-4
    )
