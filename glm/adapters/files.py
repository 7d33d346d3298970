"""Adapter files: a folder holding `adapter.safetensors` (the unsharded adapter tensors, fp32) and
`adapter_config.json` (the method, "lora" or "ptuning" (glm.adapters.methods), its options and the identity
of the base checkpoint it was trained on).

The base identity is a sha256 of the model config and of a few stored tensors (the final LayerNorm and the
first rows of the word embeddings, as fp16): the same for a checkpoint loaded in any dtype, at any
tensor-parallel size or quantized while loading, different for another model. An adapter is only attached
to the base it names; another base is a one-line ValueError.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glm.adapters.methods import METHODS, method_named, method_of
from glm.checkpoint import CheckpointFolder, open_checkpoint
from glm.config import GLMConfig
from glm.distributed import is_main
from glm.files import publish_folder
from glm.model import GLM

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "glm-adapter"
VERSION = 1
_EMBEDDING_ROWS = 16  # rows of the word embeddings hashed into the identity


def base_identity(checkpoint: str | Path | CheckpointFolder, config: GLMConfig) -> str:
    """The identity of a base model: see the module docstring."""
    shards = open_checkpoint(checkpoint).shards
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for key in ("transformer.final_layernorm.weight", "transformer.word_embeddings.weight"):
        tensor = shards.read(key)
        tensor = tensor[:_EMBEDDING_ROWS] if "embeddings" in key else tensor
        digest.update(tensor.to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapter(folder: str | Path, model: GLM, identity: str, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter (LoRA or P-tuning) into `folder` (replaced as a whole: written to a
    temporary folder beside it, then renamed, so a failure leaves the previous one untouched). Under tensor
    parallelism every rank calls it (the shards are gathered) and rank 0 alone writes."""
    from safetensors.torch import save_file

    method, options = method_of(model)
    folder = Path(folder)
    tensors = method.full_state_dict(model)
    if not is_main():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with publish_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "method": method.name,
            "options": options.to_dict(),
            "base": {"identity": identity, "model": model.config.to_dict()},
            **(extra or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An adapter folder's config and tensors; a folder that is not one is a ValueError saying so."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"--adapter {folder}: not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
            "glm-finetune writes them)"
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error.msg})") from None
    if meta.get("format") != FORMAT or meta.get("method") not in METHODS:
        raise ValueError(
            f"{config_path}: not an adapter of this project (format {meta.get('format')!r}, method "
            f"{meta.get('method')!r}; glm-finetune writes {FORMAT!r} with method {' or '.join(METHODS)})"
        )
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{config_path}: adapter format version {meta.get('version')}; this build reads {VERSION}"
        )
    return meta, load_file(folder / WEIGHTS_FILE)


def check_base(meta: dict[str, Any], identity: str, folder: str | Path, checkpoint: Any) -> None:
    """A ValueError unless the adapter was trained on the base model of `identity`."""
    theirs = meta["base"]["identity"]
    if theirs != identity:
        raise ValueError(
            f"adapter {folder} was trained on another base model (identity {theirs}), not on {checkpoint} "
            f"({identity}): pass the --checkpoint it was trained on"
        )


def attach_adapter(model: GLM, folder: str | Path, checkpoint: str | Path | CheckpointFolder) -> GLM:
    """Wrap `model` (loaded from `checkpoint`) with the adapter of `folder`, in place; returns the model."""
    meta, tensors = read_adapter(folder)
    check_base(meta, base_identity(checkpoint, model.config), folder, checkpoint)
    method = method_named(meta["method"])
    method.apply(model, method.options.from_dict(meta["options"]), initialise=False)
    try:
        method.load_full_state_dict(model, tensors)
    except ValueError as error:
        raise ValueError(f"adapter {folder}: {error}") from None
    model.eval()  # no adapter dropout when generating; the adapter's tensors stay fp32 on the model's device
    return model
