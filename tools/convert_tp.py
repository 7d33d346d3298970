"""Re-shard a checkpoint in the original layout to another tensor-parallel size.

    python tools/convert_tp.py --input-folder glm-130b-sat --output-folder glm-130b-tp4 --target-tp 4 \\
        --config glm-130b

The split rules are the original convert_tp.py's (glm/sharding.py). Unlike it: `latest` may end in a
newline, sizes are checked for divisibility, every shard's keys and shapes are checked against the model
config, the output is written one target rank at a time from memory-mapped inputs (peak memory about one
output shard plus one full tensor, not the whole model), and nothing is left behind if it fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from glm.api import resolve_config
from glm.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_shard,
    read_metadata,
    read_tag,
    shard_paths,
    write_checkpoint,
)
from glm.config import GLMConfig
from glm.model import GLM
from glm.sharding import Split, merge_tensors, split_rule, split_tensor
from glm.tokenizer import GLMTokenizer


def convert(input_folder: Path, output_folder: Path, target_tp: int, config: GLMConfig | None = None) -> Path:
    meta = read_metadata(input_folder) or {}
    if config is None:
        if "model" not in meta:
            raise CheckpointError(f"{input_folder} has no model_config.json: pass --config (e.g. glm-130b)")
        config = GLMConfig.from_dict(meta["model"])
    paths = shard_paths(input_folder)
    shards = [load_shard(p) for p in paths]  # memory-mapped: read as each key is converted
    keys = [k for k in shards[0] if split_rule(k) is not Split.IGNORED]
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GLM(config).state_dict().items()}

    unexpected, missing = set(keys) - set(expected), set(expected) - set(keys)
    if unexpected or missing:
        which = f"unexpected key '{min(unexpected)}'" if unexpected else f"missing key '{min(missing)}'"
        raise CheckpointError(f"{paths[0]}: {which} for the model config")

    def rank_state_dict(rank: int) -> dict[str, torch.Tensor]:
        state_dict = {}
        for key in keys:
            try:
                full = merge_tensors(key, [s[key] for s in shards])
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{input_folder}: cannot merge {len(paths)} shards: {e}") from None
            check_state_dict({key: full}, {key: expected[key]}, str(input_folder))
            state_dict[key] = split_tensor(key, full, target_tp)[rank]
        return state_dict

    tokenizer: GLMTokenizer | dict | None = meta.get("tokenizer")
    if tokenizer is not None and tokenizer.get("type") != "icetk":
        tokenizer = GLMTokenizer.from_config(tokenizer, input_folder)
    return write_checkpoint(
        output_folder, rank_state_dict, config, target_tp, tokenizer, read_tag(input_folder)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-folder", required=True, type=Path, help="checkpoint folder (holds 'latest')")
    parser.add_argument("--output-folder", required=True, type=Path, help="new folder; must not exist")
    parser.add_argument("--target-tp", type=int, default=4, help="tensor-parallel size to write")
    parser.add_argument(
        "--config", help="model preset or config JSON, for checkpoints without model_config.json"
    )
    args = parser.parse_args(argv)
    try:
        out = convert(args.input_folder, args.output_folder, args.target_tp, resolve_config(args.config))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} with {args.target_tp} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
