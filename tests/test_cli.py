"""The generate CLI: interactive and file modes, outputs and errors."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from glm.generate import cli

REPO = Path(__file__).resolve().parent.parent


def run(argv, monkeypatch=None, stdin: str = "") -> int:
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in argv])
    return exit_info.value.code


def test_interactive_loop(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    queries = "The river [MASK] the town.\n\n" + "word " * 80 + "\n北京是[MASK]的首都。\nstop\nnever read\n"
    args = ["--checkpoint", tiny_checkpoint, "--output-path", tmp_path, "--out-seq-length", "48"]
    assert run(args, monkeypatch, queries) == 0
    out = capsys.readouterr().out
    assert out.count("Please Input Query (stop to exit) >>> ") == 5  # stop ends the loop
    assert "Query should not be empty!" in out
    assert "error: the prompt is" in out  # the too-long query is refused and the loop goes on
    assert out.count("Output: ") == 2
    assert len(list(tmp_path.iterdir())) == 2


def test_end_of_input_exits_cleanly(tiny_checkpoint, tmp_path, monkeypatch):
    assert run(["--checkpoint", tiny_checkpoint, "--output-path", tmp_path], monkeypatch, "") == 0


def test_file_mode_writes_one_file_per_query_and_a_line_per_beam(tiny_checkpoint, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("q1\tGood tests [MASK].\n\nq2\t今天天气很好，\n")
    out_dir = tmp_path / "out"
    args = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--output-path", out_dir, "--with-id"]
    beam = ["--sampling-strategy", "BeamSearchStrategy", "--num-beams", "2", "--out-seq-length", "32"]
    assert run(args + beam + ["--print-all-beams"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["q1.txt", "q2.txt"]
    lines = (out_dir / "q1.txt").read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("Good tests") for line in lines)
    assert "Output beam 1: " in capsys.readouterr().out


def test_file_mode_batches_give_the_same_outputs(tiny_checkpoint, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("a\tThe train leaves at [MASK].\nb\t清华大学位于[MASK]。\nc\tMusic and\n")
    greedy = [
        "--top_k",
        "1",
        "--top_p",
        "0",
        "--out-seq-length",
        "40",
        "--with-id",
        "--input-source",
        queries,
    ]
    for batch in ("1", "3"):
        args = ["--checkpoint", tiny_checkpoint, "--output-path", tmp_path / batch, "--batch-size", batch]
        assert run(args + greedy) == 0
    for name in ("a.txt", "b.txt", "c.txt"):
        assert (tmp_path / "1" / name).read_text() == (tmp_path / "3" / name).read_text()


def test_a_bad_line_fails_before_anything_is_written(tiny_checkpoint, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("fine query\n" + "long " * 100 + "\n")
    out_dir = tmp_path / "out"
    args = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--output-path", out_dir]
    assert run([*args, "--out-seq-length", "30"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "--out-seq-length" in err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["--input-source", "/nonexistent/queries.txt"], "no such file"),
        (["--out-seq-length", "100000"], "maximum sequence length"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--config", "not-a-preset"], "neither a preset"),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch, extra, message):
    args = ["--checkpoint", tiny_checkpoint, "--output-path", tmp_path / "out", *extra]
    assert run(args, monkeypatch, "query\n") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and "\n" not in err


def test_generate_script_help_lists_the_original_flags():
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "generate.sh"), "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--sampling-strategy",
        "--num-beams",
        "--length-penalty",
        "--no-repeat-ngram-size",
        "--min-gen-length",
        "--temperature",
        "--top_k",
        "--top-p",
        "--out-seq-length",
        "--input-source",
        "--output-path",
        "--with-id",
        "--print-all-beams",
        "--seed",
    ):
        assert flag in result.stdout
