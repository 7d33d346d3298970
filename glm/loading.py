"""Build a model on the meta device and load a checkpoint straight into place."""

from __future__ import annotations

from pathlib import Path

import torch

from glm.checkpoint import CheckpointError, check_state_dict, load_state_dict, read_metadata
from glm.config import GLMConfig
from glm.model import GLM
from glm.tokenizer import GLMTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    # On CPU, fp32 matmuls stream weights at ~20 GB/s at batch 1 against 7-10 GB/s for bf16 (see
    # shared cpu-kernels measurements), so fp32 is both exact and fastest for decoding. GPUs use fp16 as
    # the original did.
    return torch.float32 if device.type == "cpu" else torch.float16


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}") from None


def load_model(
    folder: str | Path,
    config: GLMConfig | None = None,
    tokenizer: GLMTokenizer | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GLM, GLMTokenizer | None]:
    """Load a checkpoint folder in the original layout, with any number of tensor-parallel shards.

    `config` and `tokenizer` default to those stored in the folder's model_config.json (checkpoints this
    project writes); the original GLM-130B checkpoint has none, so pass the `glm-130b` preset and
    `GLMTokenizer.icetk()` for it. Returns the model in eval mode and the tokenizer (None if unknown).
    """
    folder = Path(folder)
    device = torch.device(device)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    meta = read_metadata(folder)
    if config is None:
        if meta is None:
            raise CheckpointError(
                f"{folder} has no model_config.json: give its model config (--config glm-130b for GLM-130B)"
            )
        config = GLMConfig.from_dict(meta["model"], source=str(folder / "model_config.json"))
    if tokenizer is None and meta is not None and "tokenizer" in meta:
        tokenizer = GLMTokenizer.from_config(meta["tokenizer"], folder)
    target_dtype = resolve_dtype(dtype, device)

    state_dict, _ = load_state_dict(folder)
    with torch.device("meta"):
        model = GLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(state_dict, expected, str(folder))
    state_dict = {k: v.to(device=device, dtype=target_dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    return model.eval(), tokenizer
