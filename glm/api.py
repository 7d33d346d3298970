"""The one-call loader shared by the CLIs, the evaluator and users, and the CLIs' model flags.

Importing this module does not import torch: command lines build their parsers from it, so `--help` and
flag errors answer before torch loads (it is imported by the functions that need it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from glm.config import PRESETS, GLMConfig, get_preset
from glm.run_config import DEFAULT_MODEL, RunConfig, apply_run_config

if TYPE_CHECKING:
    import torch

    from glm.loading import Transform
    from glm.model import GLM
    from glm.tokenizer import GLMTokenizer

__all__ = ["DEFAULT_MODEL", "load", "load_from_args", "resolve_config", "resolve_device", "run_cli"]


def resolve_config(config: str | Path | GLMConfig | None) -> GLMConfig | None:
    """A preset name, a JSON file, or a GLMConfig."""
    if config is None or isinstance(config, GLMConfig):
        return config
    if str(config) in PRESETS:
        return get_preset(str(config))
    if not Path(config).is_file():
        raise ValueError(f"--config {config}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    return GLMConfig.from_file(config)


def available_devices() -> list[str]:
    """The --device values that work here."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device from a name; `auto` is CUDA when present, else the CPU. An unknown device, or one
    this machine lacks, is a ValueError naming the devices that are available."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device '{device}'; available: {choices}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device '{device}': {why}; available: {choices}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' does not exist; available: {choices}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device '{device}': MPS is not available here; available: {choices}")
    elif parsed.type != "cpu":
        raise ValueError(f"device '{device}' is not supported; available: {choices}")
    return parsed


def load(
    checkpoint: str | Path = DEFAULT_MODEL,
    config: str | Path | GLMConfig | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_type: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    transforms: Sequence[Transform] = (),
) -> tuple[GLM, GLMTokenizer]:
    """Model and tokenizer from a checkpoint folder; config and tokenizer default to those stored with it.

    For the original GLM-130B checkpoint: `load(path, "glm-130b", tokenizer_type="icetk")`. `device` may be
    `auto` (CUDA when present, the command lines' default). `transforms` run on the meta model in order
    (tensor parallel, quantization, offload); without any, a quantized checkpoint gets the quantization
    transform its metadata records.
    """
    from glm.checkpoint import open_checkpoint
    from glm.loading import load_model
    from glm.quantized_checkpoint import checkpoint_transform
    from glm.tokenizer import GLMTokenizer

    checkpoint = open_checkpoint(checkpoint)  # read once, by the probe below and by the loader
    if not transforms:
        transforms = [t for t in [checkpoint_transform(checkpoint)] if t is not None]

    device = resolve_device(device)
    if tokenizer_type == "icetk":
        tok = GLMTokenizer.icetk(tokenizer)
    elif tokenizer is not None:
        tok = GLMTokenizer.sentencepiece(tokenizer)
    else:
        tok = None
    model, tok = load_model(
        checkpoint, resolve_config(config), tok, dtype=dtype, device=device, transforms=transforms
    )
    if tok is None:
        raise ValueError(
            f"{checkpoint} stores no tokenizer: pass --tokenizer FILE, or --tokenizer-type icetk for GLM-130B"
        )
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model only "
            f"{model.config.vocab_size} embedding rows"
        )
    return model, tok


def load_from_args(args: argparse.Namespace) -> tuple[GLM, GLMTokenizer]:
    """The model and tokenizer a command line's flags (glm.cli.common.add_model_arguments) ask for."""
    from glm import tensor_parallel
    from glm.checkpoint import open_checkpoint
    from glm.distributed import compute_device, is_main
    from glm.loading import resolve_dtype
    from glm.offload import offload_from_args
    from glm.precision import describe_matmuls
    from glm.quantized_checkpoint import transform_from_args

    run = run_config_of(args)
    args.dtype, args.device = args.dtype or "auto", args.device or "auto"
    device = compute_device(resolve_device(args.device))  # `cuda`: this rank's GPU
    checkpoint = open_checkpoint(args.checkpoint)  # shared by the quantization probe and the loader
    quantize = transform_from_args(args, checkpoint)  # None: load the weights as they are
    offload = offload_from_args(args, device, resolve_dtype(args.dtype, device))
    transforms = [t for t in (tensor_parallel.transform(), quantize, offload) if t is not None]
    model, tokenizer = load(
        checkpoint, run.model, args.tokenizer, args.tokenizer_type, args.dtype, device, transforms
    )
    if getattr(args, "adapter", None):  # after every transform: the adapter wraps the final layers
        from glm.adapters.files import attach_adapter

        attach_adapter(model, args.adapter, checkpoint)
    if is_main():  # which kernels this machine runs; the arithmetic is the same on every CPU
        print(describe_matmuls(model), file=sys.stderr, flush=True)
    return model, tokenizer


def run_config_of(args: argparse.Namespace) -> RunConfig:
    """The run config `run_cli` applied to `args`; applied here (once) for callers that parse flags
    themselves."""
    run = getattr(args, "run_config", None)
    return run if isinstance(run, RunConfig) else apply_run_config(args)


def run_cli(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> None:
    """Run a command line's main: a user error (a ValueError, as CheckpointError is, or an OSError) becomes
    one `error: ...` line and exit status 2; Ctrl-C exits with 130."""
    from glm import distributed  # torch; after parsing

    try:
        # Once, before the process group starts, so a run config's tensor_parallel_size reaches it.
        if hasattr(args, "checkpoint"):
            apply_run_config(args)
        with distributed.session(args):  # a process group under torchrun / deepspeed
            sys.exit(main(args))
    except (ValueError, OSError) as e:
        print(f"error: {distributed.rank_prefix()}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
