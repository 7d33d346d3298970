"""The quantization flags of the command lines (the original's two, plus the scheme and output layer), and
the transform they ask for. Importing this module does not import torch (parsers are built from it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from quantization.spec import DEFAULT_GROUP_SIZE, SCHEMES

if TYPE_CHECKING:
    from glm.checkpoint import CheckpointFolder
    from glm.loading import Transform


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


def transform_from_args(
    args: argparse.Namespace, checkpoint: str | Path | CheckpointFolder
) -> Transform | None:
    """The quantize transform (or None) for loading `checkpoint` with these flags."""
    from glm.quantized_checkpoint import checkpoint_transform

    if args.quantization_group_size is not None and args.quantization_scheme != "group":
        raise ValueError("--quantization-group-size needs --quantization-scheme group")
    return checkpoint_transform(
        checkpoint,
        args.quantization_bit_width,
        args.quantization_scheme,
        args.quantization_group_size,
        args.from_quantized_checkpoint,
        args.quantize_output_layer,
    )
