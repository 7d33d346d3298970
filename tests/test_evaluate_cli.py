"""The evaluate CLI: its runs, results and predictions files, progress lines, and errors before loading."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glm.evaluate as evaluate_module
from glm.evaluate import cli
from glm.evaluation.config import load_task_config, resolve_file_groups
from glm.evaluation.tasks import MultiChoiceTask, task_class
from tests.test_evaluate import GEN_ITEMS, LM_TEXT, MUL_ITEMS, REPO, argmax, jsonl, oracle_scores, write


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


def test_cli_end_to_end(tiny_checkpoint, tiny_model, data, capsys) -> None:
    model, tokenizer = tiny_model
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
    assert report["checkpoint"] == str(tiny_checkpoint) and report["complete"] is True
    assert [t["name"] for t in report["tasks"]] == ["L", "M", "G"]  # lm.yml, mul.yaml, sub/gen.yaml
    mul = report["tasks"][1]["groups"]["test"]
    assert mul["files"]["p2/test.jsonl"]["samples"] == 2
    assert set(mul["stats"]["Accuracy"]) == {"max", "median", "average"}

    predictions = [
        json.loads(line) for line in results.with_suffix(".predictions.jsonl").read_text().splitlines()
    ]
    assert [p["task"] for p in predictions].count("M") == 5 and [p["task"] for p in predictions].count(
        "G"
    ) == 2
    first = next(p for p in predictions if p["task"] == "M" and p["file"] == "p1/test.jsonl")
    item = MUL_ITEMS[0]
    assert (first["input"], first["choices"], first["label"]) == (
        item["inputs_pretokenized"],
        item["choices_pretokenized"],
        item["label"],
    )
    assert first["scores"] == pytest.approx(oracle_scores(model, tokenizer, item), abs=1e-3)
    assert first["prediction"] == argmax(first["scores"])
    generated = next(p for p in predictions if p["task"] == "G")
    assert generated["input"] == GEN_ITEMS[0]["inputs_pretokenized"] and generated["targets"] == ["x"]
    assert isinstance(generated["prediction"], str)
    window = next(p for p in predictions if p["task"] == "L")
    assert window["tokens"] > 0 and window["loss"] > 0

    # positional and --task paths together; --limit
    assert run([data / "tasks/mul.yaml", "--task", data / "tasks/lm.yml", *args, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "> Successfully load 2 tasks" in out and "Finish 2 tasks in " in out


def test_results_record_what_produced_them(tiny_checkpoint, data, capsys) -> None:
    out_dir = data / "out"
    argv = [data / "tasks/mul.yaml", "--checkpoint", tiny_checkpoint, "--data-path", data / "data"]
    argv += ["--output-dir", out_dir, "--micro-batch-size", "3"]
    old = os.umask(0o027)
    try:
        assert run([*argv, "--save-predictions"]) == 0
    finally:
        os.umask(old)
    (results,) = out_dir.glob("evaluate-*.json")
    for written in (results, results.with_suffix(".predictions.jsonl")):
        assert written.stat().st_mode & 0o777 == 0o640  # 0o666 & ~umask, not mkstemp's 0o600
    report = json.loads(results.read_text())
    commit = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert report["git_commit"] == commit and isinstance(report["git_dirty"], bool)
    assert report["torch_version"] == torch.__version__ and report["project_version"] == "0.1.0"
    assert (report["device"], report["dtype"]) == ("cpu", "float32")
    start, end = (datetime.datetime.fromisoformat(report[k]) for k in ("start_time", "end_time"))
    assert start <= end and start.tzinfo is not None
    assert (
        report["command_line"].startswith("python -m glm.evaluate ")
        and "--micro-batch-size 3" in report["command_line"]
    )
    assert report["tasks"][0]["config"]["micro_batch_size"] == 3  # the override, not the YAML's 1
    assert run([*argv[:-2], "--micro-batch-size", "0"]) == 2
    assert "--micro-batch-size must be at least 1" in capsys.readouterr().err


def test_progress_lines_for_logs(tiny_checkpoint, data, capsys) -> None:
    argv = [data / "tasks/mul.yaml", "--checkpoint", tiny_checkpoint, "--data-path", data / "data"]
    assert run([*argv, "--output-dir", data / "out"]) == 0
    err = capsys.readouterr().err  # not a TTY: plain lines
    assert "M p1/test.jsonl: 3 samples\n" in err and "M p2/test.jsonl: 2 samples\n" in err
    assert "M p1/test.jsonl: 1/3 samples (33 %), " in err and "M p1/test.jsonl: done, 3 samples in " in err


def test_progress_every_ten_percent() -> None:
    import io

    from glm.evaluation.progress import Progress

    stream = io.StringIO()
    progress = Progress("t f", 40, stream)
    for _ in range(10):
        progress.update(4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "t f: 40 samples" and lines[-1].startswith("t f: done, 40 samples in ")
    assert [line.split(" (")[1].split(" %")[0] for line in lines[1:-1]] == [
        str(p) for p in range(10, 100, 10)
    ]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_finished_tasks_survive_an_interruption(tiny_checkpoint, data, capsys, monkeypatch, failure) -> None:
    """Ctrl-C (exit 130) or a crash in the second task: the first task's results are on disk, marked
    incomplete."""
    real = MultiChoiceTask.evaluate

    def evaluate(self):
        if self.config.name == "M":
            raise failure("stop")
        return real(self)

    monkeypatch.setattr(MultiChoiceTask, "evaluate", evaluate)
    out_dir = data / "out"
    argv = [data / "tasks/lm.yml", data / "tasks/mul.yaml", "--checkpoint", tiny_checkpoint]
    argv += ["--data-path", data / "data", "--output-dir", out_dir, "--save-predictions"]
    if failure is KeyboardInterrupt:
        assert run(argv) == 130
        assert "interrupted: 1 of 2 tasks finished; their results are in " in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError):
            cli([str(a) for a in argv])
    (results,) = out_dir.glob("evaluate-*.json")
    report = json.loads(results.read_text())
    assert report["complete"] is False
    assert report["status"] == ("interrupted" if failure is KeyboardInterrupt else "failed")
    assert [t["name"] for t in report["tasks"]] == ["L"] and report["tasks_planned"] == ["L", "M"]
    assert report["tasks"][0]["groups"]["all"]["files"]["test.txt"]["metrics"]["PPL"] > 1
    predictions = results.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert predictions and all(json.loads(line)["task"] == "L" for line in predictions)
    assert not list(out_dir.glob(".*"))  # no temp files left


def test_results_are_written_after_every_task(tiny_checkpoint, data, monkeypatch) -> None:
    seen: list[dict] = []
    real = evaluate_module.write_text_atomic

    def spy(path, text):
        real(path, text)
        if path.suffix == ".json":
            seen.append(json.loads(text))

    monkeypatch.setattr(evaluate_module, "write_text_atomic", spy)
    argv = [data / "tasks/lm.yml", data / "tasks/mul.yaml", "--checkpoint", tiny_checkpoint]
    assert run([*argv, "--data-path", data / "data", "--output-dir", data / "out"]) == 0
    assert [(len(r["tasks"]), r["complete"]) for r in seen] == [(0, False), (1, False), (2, False), (2, True)]


BAD_ITEM = {"inputs_pretokenized": "a", "choices_pretokenized": ["b", "c"], "label": 0}


@pytest.mark.parametrize(
    ("yaml", "data_line", "message"),
    [
        ("name: X\ntype: mul\npath: mul\nfile_pattern: [oops\n", None, "malformed YAML"),
        ("name: X\ntype: mul\npath: mul\nmicro_batch: 2\n", None, "unknown key 'micro_batch'"),
        ("name: X\ntype: mul\npath: empty\n", None, "matched no file"),
        ("name: X\ntype: mul\npath: mul\nfile_pattern: '**/*.csv'\n", None, "matched no file"),
        ("name: X\ntype: mul\npath: missing\n", None, "does not exist"),
        (None, None, "does not exist"),
        ("name: M\ntype: mul\npath: mul\n", None, "task name 'M' is already used by "),
        (
            "name: B\ntype: mul\npath: bad\n",
            json.dumps(BAD_ITEM | {"choices_pretokenized": []}),
            "item 2: no choices",
        ),
        (
            "name: B\ntype: mul\npath: bad\n",
            json.dumps(BAD_ITEM | {"label": 2}),
            "label 2 is out of range for 2",
        ),
        (
            "name: B\ntype: mul\npath: bad\n",
            '{"inputs_pretokenized": "a",',
            "test.jsonl:2:29: malformed JSON line",
        ),
        (
            "name: B\ntype: gen\npath: bad\n",
            '{"inputs": "a"}',
            "item 2: 'inputs' must be a list of token ids",
        ),
    ],
)
def test_errors_come_before_the_model_loads(data, capsys, yaml, data_line, message) -> None:
    """One line, exit 2, nothing written; data errors too are found before the model is loaded (the
    checkpoint given does not exist, so loading it would be a different error)."""
    (data / "data/empty").mkdir()
    if data_line is not None:
        write(data / "data/bad/test.jsonl", json.dumps(BAD_ITEM) + "\n" + data_line + "\n")
    task = data / "bad.yaml"
    if yaml is not None:
        write(task, yaml)
    out_dir = data / "out"
    args = [
        "--checkpoint",
        data / "no-such-checkpoint",
        "--data-path",
        data / "data",
        "--output-dir",
        out_dir,
    ]
    assert run([data / "tasks/mul.yaml", task, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_output_dir_is_checked_before_the_model_loads(data, capsys, monkeypatch) -> None:
    monkeypatch.setattr(
        evaluate_module.os, "access", lambda path, mode: False
    )  # as root, nothing is read-only
    args = ["--checkpoint", data / "no-such-checkpoint", "--data-path", data / "data"]
    assert run([data / "tasks/mul.yaml", *args, "--output-dir", data / "out"]) == 2
    assert "is not writable; pass a folder you can write to" in capsys.readouterr().err
    monkeypatch.undo()
    (data / "file").write_text("x")
    args = [
        "--checkpoint",
        data / "no-such-checkpoint",
        "--data-path",
        data / "data",
        "--output-dir",
        data / "file",
    ]
    assert run([data / "tasks/mul.yaml", *args]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_parser_and_help_import_no_torch() -> None:
    code = (
        "import sys, glm.evaluate as m; m.build_parser().format_help(); "
        "print(sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


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


def test_shipped_offline_tasks_run(tiny_checkpoint, tmp_path, capsys) -> None:
    for path in sorted((REPO / "tasks/offline").glob("*.yaml")):
        config = load_task_config(path)
        for files in resolve_file_groups(config, REPO).values():
            for file in files:
                task_class(config).check_file(config, file)  # the shipped data pass the checks
    args = ["--checkpoint", tiny_checkpoint, "--output-dir", tmp_path, "--limit", "2"]
    assert run([REPO / "tasks/offline", *args]) == 0
    out = capsys.readouterr().out
    assert "> Successfully load 5 tasks" in out and "Group test Accuracy: max = " in out
    assert "        Finish test.txt, PPL = " in out and len(list(tmp_path.glob("evaluate-*.json"))) == 1
