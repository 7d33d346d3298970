"""The one load pipeline: build on the meta device -> apply transforms -> stream weights into place.

1. The model is built on the meta device (no memory).
2. Transforms change it in place, still without weights, in the order given: tensor-parallel sharding,
   quantization, offload (each its own file; each a no-op when off).
3. The checkpoint's memory-mapped rank files are read key by key. For each key only the slice this process
   holds is taken (glm/sharding.py's rules: a view of one file, or a concatenation of just the needed source
   slices; never a merge of the whole tensor), so a checkpoint saved with any tensor-parallel size loads at
   any other.
4. Each slice goes to the module that owns it: `module.load_weight(name, tensor, dtype, device)` when the
   module defines one (a quantized layer quantizes it there; a ValueError it raises becomes a
   CheckpointError naming the folder), otherwise it is cast, placed and assigned
   (16-bit matrices stay 16-bit for an fp32 model on the CPU: `storage_dtype`).
   Then the source pages are dropped, so peak memory is the final model plus about one source tensor; a
   tensor already in the target dtype on the CPU is not copied at all and stays memory-mapped.
5. `module.finish_loading()` runs on every module that defines it; any tensor still on meta is an error.

The folder is opened once (glm.checkpoint.CheckpointFolder): its model_config.json and memory-mapped rank
files are shared with whatever looked at it before the load (glm.load's quantization probe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from glm import cpu_matmul
from glm.checkpoint import CheckpointError, CheckpointFolder, ShardedCheckpoint, open_checkpoint
from glm.config import GLMConfig
from glm.model import GLM, Linear
from glm.sharding import ShardSpec
from glm.tokenizer import GLMTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A transform changes the model built on the meta device before any weight is read.
Transform = Callable[[GLM], GLM]


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


def check_device_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """A ValueError for bfloat16 on a GPU without it (below sm_80: V100, 2080 Ti), whose bf16 would be
    emulated, slowly, where it runs at all."""
    if dtype != torch.bfloat16 or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise ValueError(
            f"bfloat16 needs an sm_80 or newer GPU (Ampere, Hopper); {device} is sm_{major}{minor}: use "
            "--dtype float16"
        )


def assign_weight(
    module: nn.Module, name: str, tensor: Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    """The default `load_weight`: cast floating tensors to `dtype`, place on `device`, assign in place of
    the meta tensor. No copy is made when the tensor already has that dtype and device."""
    current = getattr(module, name)
    if tensor.shape != current.shape:
        raise CheckpointError(
            f"'{name}' of {type(module).__name__} has shape {tuple(tensor.shape)} in the checkpoint but the "
            f"model needs {tuple(current.shape)} (wrong config, or a shard of another tensor-parallel size?)"
        )
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if not value.is_contiguous():  # a column slice of a source shard
        value = value.contiguous()
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def check_keys(checkpoint: ShardedCheckpoint, config: GLMConfig, exact: bool = False) -> None:
    """Every key of the plain model present with its full shape, before any weight is read. Keys the plain
    model lacks (quantization scales) are left to the modules that load them, unless `exact`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GLM(config).state_dict().items()}
    missing = [k for k in expected if k not in checkpoint.keys]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{checkpoint.folder}: missing keys {', '.join(missing[:3])}{more}")
    for key in checkpoint.keys:
        if (
            key in expected
            and checkpoint.shape(key) != expected[key]
            and checkpoint.dtype(key).is_floating_point
        ):
            raise CheckpointError(
                f"{checkpoint.folder}: '{key}' has shape {tuple(checkpoint.shape(key))} but the model config "
                f"needs {tuple(expected[key])} (wrong config, or a shard of another tensor-parallel size?)"
            )


def hand_over(model: GLM, key: str, tensor: Tensor, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Give `tensor` to the module owning `key`: its `load_weight` if it has one, else `assign_weight`.
    Returns the owner."""
    owner_name, _, name = key.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    if owner is None or not hasattr(owner, name):
        raise CheckpointError(f"unexpected key '{key}' for this model")
    load = getattr(owner, "load_weight", None)
    if load is not None:
        load(name, tensor, dtype, device)
    else:
        assign_weight(owner, name, tensor, storage_dtype(owner, name, tensor, dtype, device), device)
    return owner


def storage_dtype(
    owner: nn.Module, name: str, tensor: Tensor, dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The dtype a weight is kept in: `dtype`, except that an fp16 / bf16 matrix (a block's linear layer or
    the word embeddings, which the output layer shares) stays 16-bit when the model computes in fp32 on a
    CPU with the native matmul (glm/cpu_matmul.py). That kernel widens the weights to fp32 in registers,
    which is exact, so the results are the fp32 model's while decode streams half the bytes; prefill widens
    a layer's weight per call. The bias, LayerNorms and KV cache stay fp32."""
    if (
        name == "weight"
        and dtype == torch.float32
        and tensor.dtype in (torch.float16, torch.bfloat16)
        and device.type == "cpu"
        and (type(owner) is Linear or isinstance(owner, nn.Embedding))
        and cpu_matmul.native() is not None
    ):
        return tensor.dtype
    return dtype


def finish_loading(model: GLM) -> None:
    """Run every module's `finish_loading` hook, once all its tensors have arrived."""
    for module in model.modules():
        finish = getattr(module, "finish_loading", None)
        if finish is not None:
            try:
                finish()
            except CheckpointError:
                raise
            except ValueError as e:  # a module that is not glm's (quantization) reports a bad checkpoint
                raise CheckpointError(str(e)) from None


def load_weights(model: GLM, checkpoint: ShardedCheckpoint, dtype: torch.dtype, device: torch.device) -> GLM:
    """Stream the checkpoint into a (transformed) meta model, key by key; see the module docstring."""
    check_keys(checkpoint, model.config)
    shard: ShardSpec = getattr(model, "shard", ShardSpec())
    for key in checkpoint.keys:
        tensor = checkpoint.read(key, shard.rank, shard.world_size)
        try:
            owner = hand_over(model, key, tensor, dtype, device)
        except ValueError as e:  # CheckpointError, or a load_weight hook's ValueError
            raise CheckpointError(f"{checkpoint.folder}: {e}") from None
        del tensor
        checkpoint.release(key, kept=getattr(owner, key.rpartition(".")[2], None))
    finish_loading(model)
    unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        more = f" and {len(unloaded) - 3} more" if len(unloaded) > 3 else ""
        raise CheckpointError(f"{checkpoint.folder}: no weights for {', '.join(unloaded[:3])}{more}")
    return model


def load_model(
    folder: str | Path | CheckpointFolder,
    config: GLMConfig | None = None,
    tokenizer: GLMTokenizer | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    transforms: Sequence[Transform] = (),
) -> tuple[GLM, GLMTokenizer | None]:
    """Load a checkpoint folder in the original layout, saved with any number of tensor-parallel shards.

    `config` and `tokenizer` default to those stored in the folder's model_config.json (checkpoints this
    project writes); the original GLM-130B checkpoint has none, so pass the `glm-130b` preset and
    `GLMTokenizer.icetk()` for it. `transforms` are applied to the meta model before weights are read.
    Returns the model in eval mode and the tokenizer (None if unknown). `folder` may be one already opened
    (`glm.checkpoint.open_checkpoint`), whose metadata and rank files are then not read again.
    """
    source = open_checkpoint(folder)
    folder = source.folder
    device = torch.device(device)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    meta = source.metadata
    if config is None:
        if meta is None:
            raise CheckpointError(
                f"{folder} has no model_config.json: give its model config (--config glm-130b for GLM-130B)"
            )
        config = GLMConfig.from_dict(meta["model"], source=str(folder / "model_config.json"))
    if tokenizer is None and meta is not None and "tokenizer" in meta:
        tokenizer = GLMTokenizer.from_config(meta["tokenizer"], folder)
    target_dtype = resolve_dtype(dtype, device)
    check_device_dtype(target_dtype, device)
    checkpoint = source.shards

    with torch.device("meta"):
        model = GLM(config)
    for transform in transforms:
        model = transform(model)
    model.compute_device = device
    load_weights(model, checkpoint, target_dtype, device)
    return model.eval(), tokenizer
