"""Fill the blanks of queries typed interactively or read from a file: `python -m glm.generate --help`.

Flags, the input file and the output folder are all checked before the model loads; torch is imported
only after the flags are parsed, so `--help` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glm.api import load_from_args, run_cli
from glm.cli.generate import DEFAULT_OUT_SEQ_LENGTH, build_parser
from glm.decoding.options import GenerationOptions
from glm.files import write_text_atomic

if TYPE_CHECKING:
    from glm.decoding.infill import Answer, GenerationStats, Query
    from glm.model import GLM
    from glm.tokenizer import GLMTokenizer

PROMPT = "\nPlease Input Query (stop to exit) >>> "
MAX_ID_BYTES = 200  # "<id>.txt" and its temporary name must fit the usual 255-byte file-name limit
LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # what str.splitlines splits on
BLANK_STYLE = {True: ("\033[4m", "\033[0m"), False: ("\x1b[0;32m\033[4m", "\033[0m\x1b[0m")}  # by gmask


def check_output_folder(path: Path) -> None:
    """An output folder that exists and is writable, or that can be created."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-path {path} is a file, not a folder; choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output-path {path}: {existing} is a file, so the folder cannot be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output-path {path}: {existing} is not writable; choose another folder")


def id_problem(query_id: str) -> str | None:
    """Why an id cannot name an output file, or None."""
    if not query_id:
        return "is empty"
    if any(c in query_id for c in ("/", "\\", "\0")) or ".." in query_id or query_id == ".":
        return "is not a plain file name (no '/', '\\' or '..')"
    if len(query_id.encode()) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def split_id(line: str, with_id: bool, where: str) -> tuple[str | None, str]:
    """(id, query) of an input line; `where` names the line in errors."""
    if not with_id:
        return None, line
    if "\t" not in line:
        raise ValueError(f"{where}: --with-id expects 'id<TAB>query'")
    query_id, text = line.split("\t", 1)
    problem = id_problem(query_id)
    if problem:
        raise ValueError(f"{where}: the id {query_id!r} {problem}; ids name the output files")
    if not text.strip():
        raise ValueError(f"{where}: no query after the id {query_id!r}")
    return query_id, text.strip()


def read_queries(path: Path, with_id: bool) -> list[tuple[int, str | None, str]]:
    """(line number, id, query) of every non-blank line of a UTF-8 file, with ids checked."""
    if not path.is_file():
        raise ValueError(f"--input-source {path}: no such file (or use 'interactive')")
    queries, first_line = [], {}
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff" if n == 1 else "").strip()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                "line); save the file as UTF-8"
            ) from None
        if not line:
            continue
        query_id, text = split_id(line, with_id, f"{path} line {n}")
        if query_id is not None:
            if query_id in first_line:
                raise ValueError(
                    f"{path} line {n}: the id {query_id!r} is already used on line {first_line[query_id]}; "
                    "ids name the output files, so each must be unique"
                )
            first_line[query_id] = n
        queries.append((n, query_id, text))
    if not queries:
        raise ValueError(f"{path} holds no queries (it is empty or blank); write one query per line")
    return queries


# ---------------------------------------------------------------- output


def one_line(text: str) -> str:
    """The text as one line (line breaks become spaces), as printed and saved."""
    return LINE_BREAKS.sub(" ", text)


def style(answer: Answer, tokenizer: GLMTokenizer, gmask: bool, color: bool) -> str:
    """The answer as one line, its blanks underlined (green for [MASK]/[sMASK]) when `color`, as the
    original prints it; without color, exactly the line saved to the file."""
    start, end = BLANK_STYLE[gmask]
    return "".join(
        start + one_line(t) + end if blank and color else one_line(t)
        for t, blank in answer.segments(tokenizer)
    )


def write_answers(path: Path, answers: list[Answer], tokenizer: GLMTokenizer) -> None:
    """One line per answer; the file appears complete or not at all. Only rank 0 of a job writes."""
    from glm.distributed import is_main

    if not is_main():
        return
    write_text_atomic(path, "".join(one_line(a.text(tokenizer)) + "\n" for a in answers))


def output_file(output_path: Path, query: str, query_id: str | None) -> Path:
    if query_id is not None:
        return output_path / f"{query_id}.txt"
    prefix = query.replace("/", "")[:20]
    path = output_path / f"{prefix}-{time.strftime('%m-%d-%H-%M-%S')}.txt"
    n = 1
    while path.exists():  # the original overwrote same-second outputs of queries with the same prefix
        path, n = output_path / f"{prefix}-{time.strftime('%m-%d-%H-%M-%S')}-{n}.txt", n + 1
    return path


def query_seed(seed: int, number: int) -> int:
    """The seed of query `number` (its line, or its number in an interactive session)."""
    return seed * 1_000_003 + number


def report_speed(stats: GenerationStats) -> None:
    from glm.distributed import is_main

    if not is_main():
        return
    first = "-" if stats.first_token_seconds is None else f"{stats.first_token_seconds:.2f} s"
    print(
        f"{stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s, "
        f"first token after {first}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------- the two modes


def main(args: argparse.Namespace) -> int:
    options = GenerationOptions(
        sampling_strategy=args.sampling_strategy,
        out_seq_length=args.out_seq_length or DEFAULT_OUT_SEQ_LENGTH,
        max_new_tokens=args.max_new_tokens,
        min_gen_length=args.min_gen_length,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        deterministic=args.deterministic,
    )
    output_path = Path(args.output_path)
    check_output_folder(output_path)
    queries = (
        None if args.input_source == "interactive" else read_queries(Path(args.input_source), args.with_id)
    )

    model, tokenizer = load_from_args(args)
    max_length = model.config.max_sequence_length
    if args.out_seq_length is None and args.max_new_tokens is not None:
        options = dataclasses.replace(options, out_seq_length=max_length)
    if options.out_seq_length > max_length:
        raise ValueError(
            f"--out-seq-length {options.out_seq_length} exceeds the model's maximum sequence length "
            f"{max_length}"
        )
    session = Session(model, tokenizer, options, args, output_path)
    if queries is None:
        return session.interactive()
    return session.from_file(queries)


class Session:
    """A loaded model and the flags: answers queries, prints them and writes their files."""

    def __init__(
        self,
        model: GLM,
        tokenizer: GLMTokenizer,
        options: GenerationOptions,
        args: argparse.Namespace,
        output_path: Path,
    ) -> None:
        self.model, self.tokenizer, self.options, self.args = model, tokenizer, options, args
        self.output_path = output_path
        self.color = sys.stdout.isatty()

    def fill(self, queries: list[Query], numbers: list[int], on_text=None) -> tuple[list[list[Answer]], Any]:
        from glm.decoding import infill

        stats = infill.GenerationStats()
        seeds = [query_seed(self.args.seed, n) for n in numbers]
        answers = infill.fill_blanks(self.model, self.tokenizer, queries, self.options, on_text, seeds, stats)
        return answers, stats

    def prepare(self, text: str, where: str) -> Query:
        """`text` as a query (prepared once), with room to generate under --out-seq-length."""
        from glm.decoding.infill import prepare_query

        query = prepare_query(text, self.tokenizer)
        length = len(query.ids) + 1
        if length >= self.options.out_seq_length:
            raise ValueError(
                f"{where}: the query is {length} tokens with sop, which leaves no room under "
                f"--out-seq-length {self.options.out_seq_length}; shorten it or raise --out-seq-length"
            )
        return query

    def show(self, query: Query, answers: list[Answer]) -> None:
        gmask = query.use_gmask
        if self.args.print_all_beams and len(answers) > 1:
            for i, answer in enumerate(answers):
                print(f"Output beam {i}: {style(answer, self.tokenizer, gmask, self.color)}")
        else:
            print(f"Output: {style(answers[0], self.tokenizer, gmask, self.color)}")

    def interactive(self) -> int:
        """Ask for queries until `stop`, end of input or Ctrl-C at the prompt (exit status 130). Ctrl-C while
        generating cancels that answer and asks for the next query."""
        from glm.distributed import input_on_main

        if sys.stdin.isatty():
            enable_line_editing()
        used: dict[str, int] = {}
        number = 0
        while True:
            try:
                line = input_on_main(PROMPT).strip()  # rank 0 reads; every rank of a job gets it
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                return 130
            if line == "stop":
                return 0
            if not line:
                print("Query should not be empty!")
                continue
            number += 1
            try:
                query_id, text = split_id(line, self.args.with_id, f"query {number}")
                if query_id in used:
                    raise ValueError(
                        f"query {number}: the id {query_id!r} is already used by query {used[query_id]}; "
                        "ids name the output files, so each must be unique"
                    )
                self.answer_one(number, query_id, text)
                if query_id is not None:
                    used[query_id] = number
            except ValueError as e:  # a bad query: say why and ask for the next one
                print(f"error: {e}")
            except KeyboardInterrupt:
                print("cancelled (Ctrl-C at the prompt exits)")

    def answer_one(self, number: int, query_id: str | None, text: str) -> None:
        start = time.time()
        query = self.prepare(text, f"query {number}")
        streaming = self.options.sampling_strategy == "BaseStrategy"
        if streaming:  # the Output line is written as it is generated
            print("Output: ", end="", flush=True)
            opening, closing = BLANK_STYLE[query.use_gmask]

            def on_text(piece: str, blank: bool) -> None:
                piece = one_line(piece)
                print(opening + piece + closing if blank and self.color else piece, end="", flush=True)

            try:
                (answers,), stats = self.fill([query], [number], on_text)
            finally:
                print()
        else:
            print("Generating ...", flush=True)
            (answers,), stats = self.fill([query], [number])
            self.show(query, answers)
        write_answers(output_file(self.output_path, text, query_id), answers, self.tokenizer)
        report_speed(stats)
        print(f"Taken time {time.time() - start:.2f}")

    def from_file(self, queries: list[tuple[int, str | None, str]]) -> int:
        # Check every query's length before generating anything, so a bad line costs no half-finished run.
        prepared = [self.prepare(text, f"{self.args.input_source} line {n}") for n, _, text in queries]
        size = self.args.batch_size
        for i in range(0, len(queries), size):
            batch, batch_queries = queries[i : i + size], prepared[i : i + size]
            start = time.time()
            print(f"Working on No. {batch[0][0]}" + (f"-{batch[-1][0]}" if len(batch) > 1 else "") + "...")
            results, stats = self.fill(batch_queries, [n for n, _, _ in batch])
            for (_, query_id, text), query, answers in zip(batch, batch_queries, results, strict=True):
                print(f"Input: {text}")
                self.show(query, answers)
                write_answers(output_file(self.output_path, text, query_id), answers, self.tokenizer)
            report_speed(stats)
            print(f"Taken time {time.time() - start:.2f}")
        return 0


def enable_line_editing() -> None:
    """Line editing and history for input() (readline), where the platform has it."""
    with contextlib.suppress(ImportError):
        importlib.import_module("readline")


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, build_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
