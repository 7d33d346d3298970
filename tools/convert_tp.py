"""Re-shard a checkpoint in the original layout to another tensor-parallel size.

    python tools/convert_tp.py --input-folder glm-130b-sat --output-folder glm-130b-tp4 --target-tp 4 \\
        --config glm-130b

The split rules are the original convert_tp.py's (glm/sharding.py), applied as the loader applies them:
each output rank reads from the memory-mapped input shards only the slices it holds, so the whole
conversion reads each input byte about once (the original merged every tensor in RAM; an earlier version of
this tool merged every key once per output rank) and peak memory is about one output shard. Unlike the
original: `latest` may end in a newline, sizes are checked for divisibility, every key and shape is checked
against the model config before anything is written, and the output folder appears only when complete (a
temporary folder is renamed at the end; Ctrl-C or SIGTERM removes it, and a rerun removes one a killed run
left behind).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from quantization.spec import DEFAULT_GROUP_SIZE, SCHEMES

if TYPE_CHECKING:  # torch is imported only after the arguments are parsed, so --help is instant
    from glm.config import GLMConfig


def convert(
    input_folder: Path,
    output_folder: Path,
    target_tp: int,
    config: GLMConfig | None = None,
    quantization_bit_width: int | None = None,
    quantization_scheme: str = "row",
    quantization_group_size: int | None = None,
) -> tuple[Path, int]:
    """Write `output_folder` with `target_tp` shards; returns it and the number of input bytes read.

    With `quantization_bit_width` a float input is quantized per output rank (each rank's slice gets its
    own scales, as the original); a quantized input is re-sharded exactly and keeps its metadata."""
    from glm.checkpoint import (
        CheckpointError,
        ShardedCheckpoint,
        check_tensor_parallel_size,
        read_metadata,
        read_tag,
        write_checkpoint,
    )
    from glm.config import GLMConfig
    from glm.loading import check_keys
    from glm.quantized_checkpoint import ConversionPlan, has_scales
    from glm.tokenizer import GLMTokenizer

    meta = read_metadata(input_folder) or {}
    if config is None:
        if "model" not in meta:
            raise CheckpointError(f"{input_folder} has no model_config.json: pass --config (e.g. glm-130b)")
        config = GLMConfig.from_dict(meta["model"])
    check_tensor_parallel_size(config, target_tp)
    checkpoint = ShardedCheckpoint(input_folder)
    check_keys(checkpoint, config, exact=not has_scales(checkpoint))
    plan = ConversionPlan(
        checkpoint, meta, quantization_bit_width, quantization_scheme, quantization_group_size
    )

    def rank_state_dict(rank: int) -> dict:
        state_dict = {}
        for key in checkpoint.keys:
            piece = checkpoint.read(key, rank, target_tp)
            if piece.untyped_storage().nbytes() != piece.numel() * piece.element_size():
                piece = piece.clone()  # a view: torch.save would write the whole source storage
            state_dict.update(plan.entries(key, piece))
        return state_dict

    tokenizer: GLMTokenizer | dict | None = meta.get("tokenizer")
    if tokenizer is not None and tokenizer.get("type") != "icetk":
        tokenizer = GLMTokenizer.from_config(tokenizer, input_folder)
    out = write_checkpoint(
        output_folder,
        rank_state_dict,
        config,
        target_tp,
        tokenizer,
        read_tag(input_folder),
        extra_metadata=plan.metadata(target_tp),
    )
    if not plan.quantized_output:
        print(
            "note: the output keeps float weights (--quantization-bit-width 4|8 writes a quantized one)",
            file=sys.stderr,
        )
    return out, checkpoint.bytes_read


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through write_checkpoint, which removes its temporary folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-folder", required=True, type=Path, help="checkpoint folder (holds 'latest')")
    parser.add_argument("--output-folder", required=True, type=Path, help="new folder; must not exist")
    parser.add_argument(
        "--target-tp", required=True, type=int, help="tensor-parallel size to write (must divide the heads)"
    )
    parser.add_argument(
        "--config", help="model preset or config JSON, for checkpoints without model_config.json"
    )
    quantization = parser.add_argument_group("quantization (quantized inputs are re-sharded as they are)")
    quantization.add_argument(
        "--quantization-bit-width", type=int, choices=[4, 8], help="write INT4 or INT8 block weights"
    )
    quantization.add_argument(
        "--quantization-scheme",
        choices=SCHEMES,
        default="row",
        help="row: one scale per output row (the original's); "
        "group: one per --quantization-group-size columns",
    )
    quantization.add_argument(
        "--quantization-group-size",
        type=int,
        help=f"input columns per scale with --quantization-scheme group (default {DEFAULT_GROUP_SIZE})",
    )
    args = parser.parse_args(argv)
    if args.quantization_group_size is not None and args.quantization_scheme != "group":
        parser.error("--quantization-group-size needs --quantization-scheme group")

    from glm.api import resolve_config
    from glm.checkpoint import CheckpointError
    from glm.files import remove_stale_temp_folders

    for stale in remove_stale_temp_folders(args.output_folder):
        print(f"removed {stale}, left by an interrupted conversion", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        out, read = convert(
            args.input_folder,
            args.output_folder,
            args.target_tp,
            resolve_config(args.config),
            args.quantization_bit_width,
            args.quantization_scheme,
            args.quantization_group_size,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.output_folder}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {out} with {args.target_tp} shard(s), read {read / 2**20:.1f} MiB of input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
