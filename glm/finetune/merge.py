"""`glm-finetune --merge FOLDER --adapter A --checkpoint BASE`: the base checkpoint with W + scaling B A in
place of every adapted weight, written in the original layout at the base's tensor-parallel size (atomic:
glm.checkpoint.write_checkpoint). The result loads and runs without the adapter, and without its cost."""

from __future__ import annotations

import argparse

import torch

from glm.adapters.files import base_identity, check_base, read_adapter
from glm.adapters.lora import LoRAOptions, merge_into
from glm.api import run_config_of
from glm.checkpoint import load_state_dict, open_checkpoint, save_checkpoint
from glm.config import GLMConfig
from glm.loading import DTYPES
from glm.tokenizer import GLMTokenizer


def merge_adapter(
    checkpoint: str, adapter: str, output: str, config: GLMConfig | None = None, dtype: str = "same"
) -> None:
    """Write `checkpoint` with `adapter` merged to `output`; see the module docstring."""
    folder = open_checkpoint(checkpoint)
    meta = folder.metadata
    if config is None:
        if meta is None:
            raise ValueError(
                f"{checkpoint} has no model_config.json: give its --config (glm-130b for GLM-130B)"
            )
        config = GLMConfig.from_dict(meta["model"])
    if meta is not None and meta.get("quantization_bit_width"):
        raise ValueError(
            f"{checkpoint} is quantized: merge the adapter into the float checkpoint it was made from, "
            "then quantize the result"
        )
    adapter_meta, tensors = read_adapter(adapter)
    if adapter_meta["method"] != "lora":
        raise ValueError(
            f"--merge: {adapter} is a P-tuning adapter (prefix keys and values every layer attends to, not a "
            "weight update): it cannot be merged into the weights; load it with --adapter instead"
        )
    check_base(adapter_meta, base_identity(folder, config), adapter, checkpoint)
    state, tensor_parallel_size = load_state_dict(folder.folder)
    scaling = LoRAOptions.from_dict(adapter_meta["options"]).scaling
    merged = merge_into(state, tensors, scaling, None if dtype == "same" else DTYPES[dtype])
    tokenizer = None
    if meta is not None and "tokenizer" in meta and meta["tokenizer"].get("type") != "icetk":
        tokenizer = GLMTokenizer.from_config(meta["tokenizer"], folder.folder)
    save_checkpoint(merged, output, config, tokenizer, tensor_parallel_size)


def merge_main(args: argparse.Namespace) -> int:
    config = run_config_of(args).model  # a --config's model shape; None: the checkpoint's own
    with torch.no_grad():
        merge_adapter(args.checkpoint, args.adapter, args.merge, config, args.merge_dtype)
    print(f"merged {args.adapter} into {args.checkpoint}: {args.merge}")
    return 0
