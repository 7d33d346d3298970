"""Fill the blanks of queries typed interactively or read from a file: `python -m glm.generate --help`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from glm.api import add_model_arguments, load_from_args, run_cli
from glm.infill import Answer, GenerationOptions, fill_blanks, prepare_query
from glm.model import GLM
from glm.tokenizer import GLMTokenizer

PROMPT = "\nPlease Input Query (stop to exit) >>> "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate",
        description="Fill [MASK] (a span), [sMASK] (a sentence) and [gMASK] (an open continuation) "
        "blanks with a GLM model. A query without a mask gets [gMASK] appended.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)

    gen = parser.add_argument_group("generation (defaults are those of the original scripts/generate.sh)")
    defaults = GenerationOptions()
    gen.add_argument(
        "--sampling-strategy",
        default=defaults.sampling_strategy,
        choices=["BaseStrategy", "BeamSearchStrategy"],
    )
    gen.add_argument(
        "--out-seq-length", type=int, default=defaults.out_seq_length, help="max length, context included"
    )
    gen.add_argument("--min-gen-length", type=int, default=defaults.min_gen_length, help="beam search only")
    gen.add_argument("--num-beams", type=int, default=defaults.num_beams)
    gen.add_argument("--length-penalty", type=float, default=defaults.length_penalty)
    gen.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size)
    gen.add_argument(
        "--deterministic", action="store_true", help="beam search takes the top candidates, not samples"
    )
    gen.add_argument("--temperature", type=float, default=defaults.temperature)
    gen.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=defaults.top_k, help="0 = off")
    gen.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=defaults.top_p, help="0 = off")
    gen.add_argument("--seed", type=int, default=1234)

    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--input-source", default="interactive", help="'interactive' or a file with one query per line"
    )
    io.add_argument("--output-path", default="samples", help="folder for one .txt file per query")
    io.add_argument(
        "--with-id", action="store_true", help="input lines are 'id<TAB>query'; outputs go to <id>.txt"
    )
    io.add_argument("--print-all-beams", action="store_true", help="print every beam, not only the best")
    io.add_argument("--batch-size", type=int, default=1, help="file mode: queries generated together")
    return parser


def style(answer: Answer, tokenizer: GLMTokenizer, gmask: bool, color: bool) -> str:
    """The answer's text with its blanks underlined (green for [MASK]/[sMASK]), as the original prints it."""
    if not color:
        return answer.text(tokenizer)
    start, end = ("\033[4m", "\033[0m") if gmask else ("\x1b[0;32m\033[4m", "\033[0m\x1b[0m")
    pieces, last = [], 0
    for s, e in answer.spans:
        pieces += [
            tokenizer.detokenize(answer.ids[last:s]),
            start + tokenizer.detokenize(answer.ids[s:e]) + end,
        ]
        last = e
    pieces.append(tokenizer.detokenize(answer.ids[last:]))
    text = pieces[0] if pieces else ""
    for piece in pieces[1:]:  # sentencepiece drops the leading space of each piece; restore it for English
        text += (" " if text.isascii() and piece.isascii() and text and piece else "") + piece
    return text


def write_answers(path: Path, answers: list[Answer], tokenizer: GLMTokenizer) -> None:
    """One line per answer, written to a temporary file first so a failure leaves no partial output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for answer in answers:
            f.write(" ".join(answer.text(tokenizer).splitlines()) + "\n")  # one line per answer
    os.replace(tmp, path)


def output_file(output_path: Path, query: str, query_id: str | None) -> Path:
    if query_id is not None:
        return output_path / f"{query_id}.txt"
    prefix = query.replace("/", "")[:20]
    path = output_path / f"{prefix}-{time.strftime('%m-%d-%H-%M-%S')}.txt"
    n = 1
    while path.exists():  # the original overwrote same-second outputs of queries with the same prefix
        path, n = output_path / f"{prefix}-{time.strftime('%m-%d-%H-%M-%S')}-{n}.txt", n + 1
    return path


def split_id(line: str, with_id: bool, line_no: int) -> tuple[str | None, str]:
    if not with_id:
        return None, line
    if "\t" not in line:
        raise ValueError(f"line {line_no}: --with-id expects 'id<TAB>query'")
    query_id, text = line.split("\t", 1)
    return query_id, text


def main(args: argparse.Namespace) -> int:
    options = GenerationOptions(
        sampling_strategy=args.sampling_strategy,
        out_seq_length=args.out_seq_length,
        min_gen_length=args.min_gen_length,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        deterministic=args.deterministic,
    )
    if args.input_source != "interactive" and not Path(args.input_source).is_file():
        raise FileNotFoundError(f"--input-source {args.input_source}: no such file (or use 'interactive')")
    model, tokenizer = load_from_args(args)
    if options.out_seq_length > model.config.max_sequence_length:
        raise ValueError(
            f"--out-seq-length {options.out_seq_length} exceeds the model's maximum sequence length "
            f"{model.config.max_sequence_length}"
        )
    torch.manual_seed(args.seed)
    output_path = Path(args.output_path)
    color = sys.stdout.isatty()

    def show(text: str, answers: list[Answer]) -> None:
        gmask = prepare_query(text, tokenizer).use_gmask
        if args.print_all_beams and len(answers) > 1:
            for i, answer in enumerate(answers):
                print(f"Output beam {i}: {style(answer, tokenizer, gmask, color)}")
        else:
            print(f"Output: {style(answers[0], tokenizer, gmask, color)}")

    if args.input_source == "interactive":
        return interactive(model, tokenizer, options, args, output_path, show)
    return from_file(model, tokenizer, options, args, output_path, show)


def interactive(
    model: GLM,
    tokenizer: GLMTokenizer,
    options: GenerationOptions,
    args: argparse.Namespace,
    output_path: Path,
    show: Callable[[str, list[Answer]], None],
) -> int:
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print()
            return 0
        if line == "stop":
            return 0
        if not line:
            print("Query should not be empty!")
            continue
        start = time.time()
        try:
            query_id, text = split_id(line, args.with_id, 1)
            print("Generating: ", end="", flush=True)
            (answers,) = fill_blanks(
                model, tokenizer, [text], options, on_text=lambda t, _: print(t, end="", flush=True)
            )
            print()
        except ValueError as e:  # a bad query: say why and ask for the next one
            print(f"\nerror: {e}")
            continue
        show(text, answers)
        write_answers(output_file(output_path, text, query_id), answers, tokenizer)
        print(f"Taken time {time.time() - start:.2f}")


def from_file(
    model: GLM,
    tokenizer: GLMTokenizer,
    options: GenerationOptions,
    args: argparse.Namespace,
    output_path: Path,
    show: Callable[[str, list[Answer]], None],
) -> int:
    path = Path(args.input_source)
    queries = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        if raw.strip():
            queries.append((n, *split_id(raw.strip(), args.with_id, n)))
    # Check every query before generating anything, so a bad line does not cost a half-finished run.
    for n, _, text in queries:
        length = len(prepare_query(text, tokenizer).ids) + 1
        if length >= options.out_seq_length:
            raise ValueError(
                f"{path} line {n}: the query is {length} tokens, which leaves no room under --out-seq-length "
                f"{options.out_seq_length}; shorten it or raise --out-seq-length"
            )
    for i in range(0, len(queries), args.batch_size):
        batch = queries[i : i + args.batch_size]
        start = time.time()
        print(f"Working on No. {batch[0][0]}" + (f"-{batch[-1][0]}" if len(batch) > 1 else "") + "...")
        results = fill_blanks(model, tokenizer, [text for _, _, text in batch], options)
        for (_, query_id, text), answers in zip(batch, results, strict=True):
            print(f"Input: {text}")
            show(text, answers)
            write_answers(output_file(output_path, text, query_id), answers, tokenizer)
        print(f"Taken time {time.time() - start:.2f}")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, build_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
