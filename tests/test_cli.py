"""The generate CLI: interactive and file modes, outputs and errors."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import glm.decoding.infill
from glm.generate import build_parser, cli

REPO = Path(__file__).resolve().parent.parent
GREEDY = ["--top_k", "1", "--top_p", "0"]


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
    assert "error: query 2: the query is" in out  # the too-long query is refused and the loop goes on
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
        (["--device", "tpu"], "unknown device 'tpu'; available: auto, cpu"),
        (["--device", "meta"], "device 'meta' is not supported; available: auto, cpu"),
        pytest.param(
            ["--device", "cuda"],
            "device 'cuda': ",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
        ),
        (["--device", "cuda:99"], "available: auto, cpu"),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch, extra, message):
    args = ["--checkpoint", tiny_checkpoint, "--output-path", tmp_path / "out", *extra]
    assert run(args, monkeypatch, "query\n") == 2
    # the start-up line naming the matmul paths (glm/precision.py) comes before any error found after loading
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("glm: "))
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


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--top_p", "1.5", "argument --top_p/--top-p: must be between 0 and 1, got 1.5"),
        ("--top-p", "-0.1", "must be between 0 and 1, got -0.1"),
        ("--top_p", "nan", "must be between 0 and 1, got nan"),
        ("--top_k", "-1", "argument --top_k/--top-k: must be an integer >= 0, got -1"),
        ("--length-penalty", "nan", "argument --length-penalty: must be a finite number, got nan"),
        ("--length-penalty", "inf", "must be a finite number, got inf"),
        ("--temperature", "0", "argument --temperature: must be a positive number, got 0.0"),
        ("--temperature", "inf", "must be a positive number, got inf"),
        ("--num-beams", "0", "argument --num-beams: must be an integer >= 1, got 0"),
        ("--out-seq-length", "1", "argument --out-seq-length: must be an integer >= 2, got 1"),
        ("--max-new-tokens", "0", "argument --max-new-tokens: must be an integer >= 1, got 0"),
        ("--min-gen-length", "-1", "must be an integer >= 0, got -1"),
        ("--no-repeat-ngram-size", "-2", "must be an integer >= 0, got -2"),
        ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got 0"),
        ("--top_k", "abc", "argument --top_k/--top-k: invalid int value: 'abc'"),
    ],
)
def test_nonsense_numbers_are_one_line_errors_before_loading(capsys, flag, value, message):
    # A missing checkpoint would be the error if the flag were checked after loading.
    assert run(["--checkpoint", "/nonexistent/ckpt", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {flag.split('/')[0][:4]}") and "\n" not in err
    assert message in err and err.endswith(" (see generate --help)")


def write_queries(tmp_path: Path, data: str | bytes) -> Path:
    path = tmp_path / "queries.txt"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "data,with_id,message",
    [
        (
            b"fine\n\xff\xfebad\n",
            False,
            "queries.txt line 2: not UTF-8 text (byte 0xff at byte 1 of the line)",
        ),
        (b"", False, "queries.txt holds no queries (it is empty or blank)"),
        (b"\n  \n\n", False, "queries.txt holds no queries"),
        ("a\tfine\n../../evil\tquery\n", True, "queries.txt line 2: the id '../../evil' is not a plain file"),
        ("sub/dir\tquery\n", True, "line 1: the id 'sub/dir' is not a plain file name"),
        ("..\tquery\n", True, "line 1: the id '..' is not a plain file name"),
        ("\\share\tquery\n", True, "line 1: the id '\\\\share' is not a plain file name"),
        ("\tquery\n", True, "line 1: --with-id expects"),  # stripped: no tab left
        ("a\tq1\nb\tq2\na\tq3\n", True, "line 3: the id 'a' is already used on line 1"),
        ("a\t \n", True, "line 1: --with-id expects"),
        ("query without id\n", True, "line 1: --with-id expects 'id<TAB>query'"),
    ],
)
def test_bad_input_files_fail_before_loading(tmp_path, capsys, data, with_id, message):
    queries = write_queries(tmp_path, data)
    out_dir = tmp_path / "out"
    args = ["--checkpoint", "/nonexistent/ckpt", "--input-source", queries, "--output-path", out_dir]
    assert run(args + (["--with-id"] if with_id else [])) == 2
    # the start-up line naming the matmul paths (glm/precision.py) comes before any error found after loading
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("glm: "))
    assert message in err and err.startswith("error: ") and "\n" not in err
    assert not out_dir.exists() and not (tmp_path.parent / "evil.txt").exists()


def test_output_path_that_is_a_file_fails_before_loading(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for path, message in [(taken, "is a file, not a folder"), (taken / "sub", "is a file, so the folder")]:
        assert run(["--checkpoint", "/nonexistent/ckpt", "--output-path", path]) == 2
        assert message in capsys.readouterr().err
    assert taken.read_text() == "keep me"


def test_unwritable_output_folder_fails_before_loading(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: let access() report what it would for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    try:
        assert run(["--checkpoint", "/nonexistent/ckpt", "--output-path", locked / "out"]) == 2
    finally:
        locked.chmod(0o755)
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_output_files_get_the_umask_mode(tiny_checkpoint, tmp_path):
    queries = write_queries(tmp_path, "q1\tRain [MASK].\n")
    args = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--output-path", tmp_path / "out"]
    old = os.umask(0o022)
    try:
        assert run([*args, "--with-id", "--out-seq-length", "24", *GREEDY]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "q1.txt").stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["q1.txt"]  # no temporary file left


def test_a_mask_lookalike_is_text_and_gets_a_continuation(tiny_checkpoint, tmp_path):
    queries = write_queries(tmp_path, "a\tHello [XMASK] world\n")
    out_dir = tmp_path / "out"
    args = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--output-path", out_dir, "--with-id"]
    assert run([*args, "--out-seq-length", "30", "--temperature", "5", "--top_p", "0"]) == 0
    answer = (out_dir / "a.txt").read_text().rstrip("\n")
    assert answer.startswith("Hello [XMASK] world") and len(answer) > len("Hello [XMASK] world")


def printed(out: str, label: str) -> list[str]:
    """What follows `label` on each line that has it (interactive lines start with the prompt)."""
    return [line.split(label, 1)[1] for line in out.splitlines() if label in line]


def test_printed_output_equals_the_saved_file(tiny_checkpoint, tmp_path, capsys):
    # Beam search (printed after generating) with the blank before punctuation and an unfilled [sMASK]:
    # the printed line is the saved line, and the [sMASK] keeps the spaces typed around it.
    queries = write_queries(
        tmp_path, "a\tTo insert a table into your [MASK].\nb\tThe [sMASK] river [MASK] town.\n"
    )
    out_dir = tmp_path / "out"
    args = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--output-path", out_dir, "--with-id"]
    beams = ["--sampling-strategy", "BeamSearchStrategy", "--num-beams", "2", "--deterministic"]
    assert run([*args, *beams, "--out-seq-length", "30", "--print-all-beams"]) == 0
    lines = printed(capsys.readouterr().out, "Output beam ")
    saved = (out_dir / "a.txt").read_text().splitlines() + (out_dir / "b.txt").read_text().splitlines()
    assert lines == [f"{i % 2}: {line}" for i, line in enumerate(saved)]
    assert saved[2].startswith("The [sMASK] river") and "[[sMASK]]" not in saved[2]


def test_interactive_stream_is_the_output_line_and_the_file(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    pieces = []
    real = glm.decoding.infill.fill_blanks

    def recording(*args, **kwargs):
        on_text = args[4]
        answers = real(*args[:4], lambda t, blank: (pieces.append(t), on_text(t, blank)), *args[5:], **kwargs)
        return answers

    monkeypatch.setattr(glm.decoding.infill, "fill_blanks", recording)
    query = "The river [MASK] the [sMASK] town, and the [MASK] was cold."
    args = ["--checkpoint", tiny_checkpoint, "--output-path", tmp_path, "--out-seq-length", "60"]
    assert run([*args, "--temperature", "0.7"], monkeypatch, query + "\nstop\n") == 0
    (line,) = printed(capsys.readouterr().out, "Output: ")
    (saved,) = [p.read_text() for p in tmp_path.iterdir()]
    assert line + "\n" == saved and "".join(pieces).replace("\n", " ") == line
    # The untrained model's blanks are noise; the text around them and the unfilled [sMASK] are as typed.
    assert (
        line.startswith("The river") and " the [sMASK] town, and the" in line and line.endswith(" was cold.")
    )


def scripted_input(monkeypatch, replies):
    """input() that returns each reply in turn; an exception reply is raised."""
    replies = iter(replies)

    def fake_input(prompt=""):
        print(prompt, end="")
        reply = next(replies)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    monkeypatch.setattr(builtins, "input", fake_input)


def test_ctrl_c_cancels_the_answer_then_exits_at_the_prompt(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    real = glm.decoding.infill.fill_blanks
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 1:
            args[4]("partial", False)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(glm.decoding.infill, "fill_blanks", interrupted_once)
    scripted_input(monkeypatch, ["first [MASK]", "second [MASK]", KeyboardInterrupt()])
    assert run(["--checkpoint", tiny_checkpoint, "--output-path", tmp_path, "--out-seq-length", "30"]) == 130
    out = capsys.readouterr().out
    assert "cancelled (Ctrl-C at the prompt exits)" in out
    assert out.count("Please Input Query") == 3 and len(printed(out, "Output: ")) == 2  # the cut one too
    assert [p.name[:6] for p in tmp_path.iterdir()] == ["second"]  # the cancelled answer is not saved


def test_with_id_interactive_refuses_bad_and_duplicate_ids(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    scripted_input(monkeypatch, ["../evil\tquery", "a\tRain [MASK].", "a\tSnow [MASK].", "stop"])
    args = [
        "--checkpoint",
        tiny_checkpoint,
        "--output-path",
        tmp_path / "out",
        "--with-id",
        "--out-seq-length",
        "24",
    ]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "error: query 1: the id '../evil' is not a plain file name" in out
    assert "error: query 3: the id 'a' is already used by query 2" in out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]
    assert not (tmp_path / "evil.txt").exists()


def test_speed_is_reported_on_stderr(tiny_checkpoint, tmp_path, capsys):
    queries = write_queries(tmp_path, "Rain [MASK].\nThe river\n")
    args = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--output-path", tmp_path / "out"]
    assert run([*args, "--out-seq-length", "24", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if not line.startswith("glm: ")]  # start-up line
    assert " tokens/s, first token after " in line and "tokens/s" not in captured.out


def test_max_new_tokens_bounds_blanks_and_lifts_the_default_length(tiny_checkpoint, tmp_path):
    query = "A [MASK] model fills [MASK] blanks."
    queries = write_queries(tmp_path, f"a\t{query}\n")
    base = ["--checkpoint", tiny_checkpoint, "--input-source", queries, "--with-id", "--temperature", "5"]
    lengths = {}
    for n in ("2", "200"):
        assert run([*base, "--output-path", tmp_path / n, "--max-new-tokens", n, "--top_p", "0"]) == 0
        lengths[n] = len((tmp_path / n / "a.txt").read_text())
    assert lengths["2"] < len(query) + 40 < lengths["200"]  # 200 > the default --out-seq-length leaves room


def test_seeded_sampling_files_do_not_depend_on_the_batch_size(tiny_checkpoint, tmp_path):
    queries = write_queries(
        tmp_path, "a\tThe train leaves at [MASK].\nb\t清华大学位于[MASK]。\nc\tMusic and\n"
    )
    for batch in ("1", "3"):
        args = ["--checkpoint", tiny_checkpoint, "--output-path", tmp_path / batch, "--batch-size", batch]
        assert (
            run([*args, "--input-source", queries, "--with-id", "--out-seq-length", "40", "--top_p", "0"])
            == 0
        )
    for name in ("a.txt", "b.txt", "c.txt"):
        assert (tmp_path / "1" / name).read_text() == (tmp_path / "3" / name).read_text()


def test_every_flag_shows_its_default_in_help():
    parser = build_parser()
    formatter = parser.formatter_class(prog="generate")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        # argparse prints nothing (so no default) for a flag without help
        assert action.help and "(default" in formatter._get_help_string(action), action.option_strings


@pytest.mark.parametrize("module", ["glm.generate"])
def test_parser_is_built_without_importing_torch(module):
    code = f"import sys, {module} as m; m.build_parser().format_help(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "False"


def read_until(fd: int, needle: bytes, seen: bytearray, start: int = 0, timeout: float = 60) -> int:
    """Read the terminal into `seen` until `needle` appears after `start`; returns where it ends."""
    deadline = time.monotonic() + timeout
    while (found := seen.find(needle, start)) < 0:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {needle!r}; got {bytes(seen)[-300:]!r}")
        try:
            seen += os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            raise AssertionError(f"exited before {needle!r}; got {bytes(seen)[-300:]!r}") from None
    return found + len(needle)


def test_interactive_line_editing_and_history_on_a_terminal(tiny_checkpoint, tmp_path):
    # On a terminal, input goes through readline: Up recalls "stpo", two backspaces and "op" make "stop".
    # Without readline the line would read "\x1bop" and be answered as a query instead of ending the loop.
    argv = [sys.executable, "-m", "glm.generate", "--checkpoint", str(tiny_checkpoint), "--output-path",
            str(tmp_path / "out"), "--out-seq-length", "20", "--device", "cpu"]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal
        os.chdir(REPO)
        os.execv(sys.executable, argv)
    seen = bytearray()
    try:
        read_until(fd, b"(stop to exit) >>> ", seen)
        os.write(fd, b"stpo\r")
        read_until(fd, b"(stop to exit) >>> ", seen, read_until(fd, b"Taken time", seen))
        os.write(fd, b"\x1b[A\x7f\x7fop\r")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(fd, 4096)
        else:
            raise AssertionError(f"still running after 'stop'; got {bytes(seen)[-300:]!r}")
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(list((tmp_path / "out").iterdir())) == 1  # only "stpo" was answered


def test_device_defaults_to_auto_which_is_cuda_when_present(monkeypatch):
    from glm.api import resolve_device

    assert build_parser().parse_args([]).device is None  # unset: load_from_args takes "auto"
    (device,) = [a for a in build_parser()._actions if "--device" in a.option_strings]
    assert device.help.startswith("auto (CUDA when present") and device.help.endswith("(default: auto)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
