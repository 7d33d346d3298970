"""The command line of `glm-generate` / `scripts/generate.sh` (no torch: `--help` answers at once)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from glm.cli.common import ArgumentParser, add_model_arguments
from glm.decoding.options import STRATEGIES, GenerationOptions, check_option

DEFAULT_OUT_SEQ_LENGTH = GenerationOptions().out_seq_length


def option_type(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that parses a flag and checks it as GenerationOptions does."""

    def convert(text: str) -> Any:
        value = parse(text)
        problem = check_option(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = parse.__name__  # argparse's "invalid int value" message
    return convert


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="generate",
        description="Fill [MASK] (a span), [sMASK] (a sentence) and [gMASK] (an open continuation) "
        "blanks with a GLM model. A query without a mask gets [gMASK] appended.",
    )
    add_model_arguments(parser)

    gen = parser.add_argument_group("generation (defaults are those of the original scripts/generate.sh)")
    d = GenerationOptions()
    gen.add_argument(
        "--sampling-strategy", default=d.sampling_strategy, choices=STRATEGIES, help="sampling or beams"
    )
    gen.add_argument(
        "--out-seq-length",
        type=option_type("out_seq_length", int),
        help=f"max length, context included (default: {DEFAULT_OUT_SEQ_LENGTH}; with --max-new-tokens alone, "
        "the model's maximum)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=option_type("max_new_tokens", int),
        help="at most this many new tokens per blank (default: only --out-seq-length limits)",
    )
    gen.add_argument(
        "--min-gen-length",
        type=option_type("min_gen_length", int),
        default=d.min_gen_length,
        help="beam search",
    )
    gen.add_argument(
        "--num-beams", type=option_type("num_beams", int), default=d.num_beams, help="beam search"
    )
    gen.add_argument(
        "--length-penalty",
        type=option_type("length_penalty", float),
        default=d.length_penalty,
        help="beam search: finished beams rank by score / ((5 + length) / 6) ** this",
    )
    gen.add_argument(
        "--no-repeat-ngram-size",
        type=option_type("no_repeat_ngram_size", int),
        default=d.no_repeat_ngram_size,
        help="beam search: no n-gram of this size twice (0 = off)",
    )
    gen.add_argument(
        "--deterministic", action="store_true", help="beam search takes the top candidates, not samples"
    )
    gen.add_argument(
        "--temperature", type=option_type("temperature", float), default=d.temperature, help="sampling"
    )
    top_k = option_type("top_k", int)
    gen.add_argument(
        "--top_k", "--top-k", dest="top_k", type=top_k, default=d.top_k, help="sampling (0 = off)"
    )
    top_p = option_type("top_p", float)
    gen.add_argument(
        "--top_p", "--top-p", dest="top_p", type=top_p, default=d.top_p, help="sampling (0 = off)"
    )
    gen.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="each query samples from its own generator, seeded by this and its line number (interactive: "
        "its number in the session), so no answer depends on --batch-size or on other queries",
    )

    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--input-source", default="interactive", help="'interactive' or a UTF-8 file with one query per line"
    )
    io.add_argument("--output-path", default="samples", help="folder for one .txt file per query")
    io.add_argument(
        "--with-id", action="store_true", help="input lines are 'id<TAB>query'; outputs go to <id>.txt"
    )
    io.add_argument("--print-all-beams", action="store_true", help="print every beam, not only the best")
    io.add_argument(
        "--batch-size", type=positive_int, default=1, help="file mode: queries generated together"
    )
    return parser


# ---------------------------------------------------------------- checks before the model loads
