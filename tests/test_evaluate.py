"""Task classes (glm.evaluation.tasks) and the evaluate CLI on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from glm.decoding import generate
from glm.evaluate import cli
from glm.evaluation.config import config_from_dict, load_task_config, resolve_file_groups
from glm.evaluation.dataset import encode_choice, encode_text
from glm.evaluation.metrics import normalize_answer
from glm.evaluation.tasks import GenerationTask, LanguageModelTask, MultiChoiceTask, task_class
from glm.scoring import choice_logprobs
from glm.strategies import BaseStrategy, BeamSearchStrategy

REPO = Path(__file__).resolve().parent.parent

MUL_ITEMS = [
    {
        "inputs_pretokenized": "北京是[MASK]的首都。",
        "choices_pretokenized": ["中国", "日本", "美国"],
        "label": 0,
    },
    {"inputs_pretokenized": "The cat sat on the", "choices_pretokenized": [" mat", " dog"], "label": 1},
    {"inputs_pretokenized": "今天天气[MASK]。", "choices_pretokenized": ["很好", "不好"], "label": 1},
]
GEN_ITEMS = [{"inputs_pretokenized": "The river [MASK] the town."}, {"inputs_pretokenized": "Music and"}]
LM_TEXT = "The river runs past the old mill and on into the town by the sea.\n" * 6


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def make_task(cls, model, tokenizer, root: Path, **config):
    return cls(model, tokenizer, config_from_dict(config), root)


def test_multiple_choice_accuracy_equals_choice_logprobs_argmax(tiny_model, tmp_path, capsys) -> None:
    model, tokenizer = tiny_model
    write(tmp_path / "mul/p1/test.jsonl", jsonl(MUL_ITEMS))
    write(tmp_path / "mul/p2/test.jsonl", jsonl(MUL_ITEMS[:1]))
    task = make_task(
        MultiChoiceTask, model, tokenizer, tmp_path, name="m", type="mul", path="mul", micro_batch_size=2
    )
    result = task.evaluate()

    correct = 0
    for item in MUL_ITEMS:
        ids = encode_text(tokenizer, item["inputs_pretokenized"])
        mask = tokenizer.get_command("[MASK]")
        if mask not in ids:
            ids.append(mask)
        choices = [encode_choice(tokenizer, c) for c in item["choices_pretokenized"]]
        scores = choice_logprobs(model, ids, choices, ids.index(mask), sop_id=tokenizer.sop_id)
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    metrics, count = result.groups["all"]["p1/test.jsonl"]
    assert count == 3 and metrics["Accuracy"] == pytest.approx(100 * correct / 3)
    out = capsys.readouterr().out
    assert "Evaluating task m:\n    Evaluating group all:\n        Finish p1/test.jsonl, Accuracy = " in out
    assert "Evaluation results of task m:\n    Group all Accuracy: max = " in out


def test_generation_em_equals_greedy_generate(tiny_model, tmp_path) -> None:
    model, tokenizer = tiny_model
    end = tokenizer.end_ids
    answers = []
    for item in GEN_ITEMS:  # by hand: [MASK] appended unless present, then sop; greedy
        ids = encode_text(tokenizer, item["inputs_pretokenized"])
        mask = tokenizer.get_command("[MASK]")
        if mask not in ids:
            ids.append(mask)
        position = ids.index(mask)
        (beams,) = generate(
            model, [[*ids, tokenizer.sop_id]], BaseStrategy(1, top_k=1, end_tokens=end), 6, [position]
        )
        out = beams[0][len(ids) + 1 :]
        answers.append(tokenizer.detokenize(out[:-1] if out and out[-1] in end else out))
    assert normalize_answer(answers[0])  # the first target is what greedy decoding gives, the second not
    items = [
        GEN_ITEMS[0] | {"targets_pretokenized": [answers[0]]},
        GEN_ITEMS[1] | {"targets_pretokenized": ["x"]},
    ]
    write(tmp_path / "gen/test.jsonl", jsonl(items))
    config = dict(name="g", type="gen", path="gen", max_gen_length=6, micro_batch_size=2)
    result = make_task(GenerationTask, model, tokenizer, tmp_path, **config).evaluate()
    metrics, count = result.groups["all"]["test.jsonl"]
    expected_em = 50.0 if normalize_answer(answers[1]) != "x" else 100.0
    assert count == 2 and metrics["EM"] == expected_em


def test_language_model_ppl(tiny_model, tmp_path) -> None:
    model, tokenizer = tiny_model
    write(tmp_path / "lm/test.txt", LM_TEXT)
    config = dict(name="l", type="lm", path="lm", file_pattern="*.txt", use_task_mask=True, max_seq_length=24)
    task = make_task(
        LanguageModelTask, model, tokenizer, tmp_path, micro_batch_size=3, generation_length=8, **config
    )
    dataset = task.build_dataset(tmp_path / "lm/test.txt")
    losses = task.predict_single_batch(dataset.samples)
    metrics, count = task.evaluate().groups["all"]["test.txt"]
    words = len(LM_TEXT.strip().split(" "))
    assert count == len(dataset.samples) > 2
    assert metrics["PPL"] == pytest.approx(math.exp(min(20, sum(losses) / words)), rel=1e-5)


def test_custom_module_and_lambada() -> None:
    config = config_from_dict(dict(name="lam", type="gen", path="gen", module="tasks.lambada.task.LAMBADA"))
    cls = task_class(config)
    assert cls.__name__ == "LAMBADA" and issubclass(cls, GenerationTask)
    from tasks.lambada.task import first_word, first_word_accuracy

    assert first_word("  commandments. And") == "commandments"
    assert first_word_accuracy(["Him", "him"], [{"targets": ["him"]}, {"targets": [" him "]}]) == 50.0
    with pytest.raises(ValueError, match=r"cannot import module 'no\.such\.Task'"):
        task_class(config_from_dict(dict(name="x", type="gen", path="gen", module="no.such.Task")))


# ------------------------------------------------------------------------------------------------- CLI


def run(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in argv])
    return exit_info.value.code


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    write(root / "mul/p1/test.jsonl", jsonl(MUL_ITEMS))
    write(root / "mul/p2/test.jsonl", jsonl(MUL_ITEMS[1:]))
    write(root / "gen/test.jsonl", jsonl([item | {"targets_pretokenized": ["x"]} for item in GEN_ITEMS]))
    write(root / "lm/test.txt", LM_TEXT)
    tasks = tmp_path / "tasks"
    write(tasks / "mul.yaml", "name: M\ntype: mul\npath: mul\nfile-pattern:\n  test: '**/test.jsonl'\n")
    write(tasks / "sub/gen.yaml", "name: G\ntype: gen\npath: gen\nmax_gen_length: 4\nmicro-batch-size: 2\n")
    write(
        tasks / "lm.yml",
        "name: L\ntype: lm\npath: lm\nfile_pattern: '*.txt'\nuse_task_mask: true\n"
        "max_seq_length: 24\ngeneration_length: 8\n",
    )
    return tmp_path


def test_cli_end_to_end(tiny_checkpoint, data, capsys) -> None:
    out_dir = data / "out"
    args = ["--checkpoint", tiny_checkpoint, "--data-path", data / "data", "--output-dir", out_dir]
    assert run([data / "tasks", *args, "--save-predictions"]) == 0
    out = capsys.readouterr().out
    assert "    Task M loaded from config " in out and "> Successfully load 3 tasks" in out
    assert (
        "        Finish p1/test.jsonl, Accuracy = " in out
        and "        Finish p2/test.jsonl, Accuracy = " in out
    )
    assert "    Group test Accuracy: max = " in out
    assert "Evaluation results of task G:\n      Group all: \n        Metric EM: max = 0.000" in out
    assert "        Finish test.txt, PPL = " in out and "Finish 3 tasks in " in out
    (results,) = out_dir.glob("evaluate-*.json")
    report = json.loads(results.read_text())
    assert report["checkpoint"] == str(tiny_checkpoint)
    assert [t["name"] for t in report["tasks"]] == ["L", "M", "G"]  # lm.yml, mul.yaml, sub/gen.yaml
    mul = report["tasks"][1]["groups"]["test"]
    assert mul["files"]["p2/test.jsonl"]["samples"] == 2 and set(mul["stats"]["Accuracy"]) == {
        "max",
        "median",
        "average",
    }
    predictions = [
        json.loads(line) for line in results.with_suffix(".predictions.jsonl").read_text().splitlines()
    ]
    assert sum(p["task"] == "M" for p in predictions) == 5 and sum(p["task"] == "G" for p in predictions) == 2

    # positional and --task paths together; --limit
    assert run([data / "tasks/mul.yaml", "--task", data / "tasks/lm.yml", *args, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "> Successfully load 2 tasks" in out and "Finish 2 tasks in " in out


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("name: M\ntype: mul\npath: mul\nfile_pattern: [oops\n", "malformed YAML"),
        ("name: M\ntype: mul\npath: mul\nmicro_batch: 2\n", "unknown key 'micro_batch'"),
        ("name: M\ntype: mul\npath: empty\n", "matched no file"),
        ("name: M\ntype: mul\npath: mul\nfile_pattern: '**/*.csv'\n", "matched no file"),
        ("name: M\ntype: mul\npath: missing\n", "does not exist"),
        (None, "does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny_checkpoint, data, capsys, yaml, message) -> None:
    (data / "data/empty").mkdir()
    task = data / "bad.yaml"
    if yaml is not None:
        write(task, yaml)
    out_dir = data / "out"
    args = ["--checkpoint", tiny_checkpoint, "--data-path", data / "data", "--output-dir", out_dir]
    assert run([data / "tasks/mul.yaml", task, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_evaluate_script_help() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts/evaluate.sh"), "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--task",
        "--data-path",
        "--checkpoint",
        "--output-dir",
        "--save-predictions",
        "--tokenizer-type",
    ):
        assert flag in result.stdout


def test_beam_search_generation_equals_generate(tiny_model, tmp_path) -> None:
    model, tokenizer = tiny_model
    write(tmp_path / "gen/test.jsonl", jsonl(GEN_ITEMS))
    config = dict(name="b", type="gen", path="gen", sampling_strategy="BeamSearchStrategy", num_beams=2)
    task = make_task(
        GenerationTask, model, tokenizer, tmp_path, max_gen_length=4, micro_batch_size=2, **config
    )
    samples = task.build_dataset(tmp_path / "gen/test.jsonl").samples
    predictions = task.predict_single_batch(samples)
    strategy = BeamSearchStrategy(
        2, 2, consider_end=True, end_tokens=tokenizer.end_ids, no_repeat_ngram_size=3, deterministic=True
    )
    contexts = [sample.tokens for sample in samples]
    outputs = generate(model, contexts, strategy, 4, [sample.mask_position for sample in samples])
    for context, beams, prediction in zip(contexts, outputs, predictions, strict=True):
        best = beams[0][len(context) :]
        best = best[:-1] if best and best[-1] in tokenizer.end_ids else best
        assert prediction == tokenizer.detokenize(best)


def test_shipped_offline_tasks_run(tiny_checkpoint, tmp_path, capsys) -> None:
    for path in sorted((REPO / "tasks/offline").glob("*.yaml")):
        config = load_task_config(path)
        assert resolve_file_groups(config, REPO)
    args = ["--checkpoint", tiny_checkpoint, "--output-dir", tmp_path, "--limit", "2"]
    assert run([REPO / "tasks/offline", *args]) == 0
    out = capsys.readouterr().out
    assert "> Successfully load 5 tasks" in out and "Group test Accuracy: max = " in out
    assert "        Finish test.txt, PPL = " in out and len(list(tmp_path.glob("evaluate-*.json"))) == 1
