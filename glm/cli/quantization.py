"""The quantization flags of the command lines (the original's two, plus the scheme and output layer);
glm.quantized_checkpoint.transform_from_args reads them. Importing this module does not import torch."""

from __future__ import annotations

import argparse

from quantization.spec import DEFAULT_GROUP_SIZE, SCHEMES


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """The --quantization-* flags; `transform_from_args` reads them."""
    group = parser.add_argument_group("quantization")
    group.add_argument(
        "--quantization-bit-width",
        type=int,
        choices=[4, 8],
        help="quantize the block weights to INT4 or INT8 while loading (checkpoints that record their "
        "quantization need no flag)",
    )
    group.add_argument(
        "--from-quantized-checkpoint",
        action="store_true",
        help="the checkpoint already holds quantized weights (the original's quantized checkpoints)",
    )
    group.add_argument(
        "--quantization-scheme",
        choices=SCHEMES,
        default="row",
        help="row: one scale per output row (the original's); group: one per --quantization-group-size "
        "input columns (more accurate INT4)",
    )
    group.add_argument(
        "--quantization-group-size",
        type=int,
        help=f"input columns per scale with --quantization-scheme group (default {DEFAULT_GROUP_SIZE})",
    )
    group.add_argument(
        "--quantize-output-layer",
        action="store_true",
        help="also give the tied output layer an INT8 copy of the word embeddings (faster decoding)",
    )
