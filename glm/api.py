"""The one-call loader shared by the CLIs, the evaluator and users, and the CLIs' model flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from glm.checkpoint import CheckpointError
from glm.config import PRESETS, GLMConfig, get_preset
from glm.loading import Transform, load_model, resolve_dtype
from glm.model import GLM
from glm.offload import add_offload_arguments, offload_from_args
from glm.run_config import apply_run_config
from glm.tokenizer import GLMTokenizer

# The model `scripts/generate.sh` runs when no checkpoint is given.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "glm-bilingual"


def resolve_config(config: str | Path | GLMConfig | None) -> GLMConfig | None:
    """A preset name, a JSON file, or a GLMConfig."""
    if config is None or isinstance(config, GLMConfig):
        return config
    if str(config) in PRESETS:
        return get_preset(str(config))
    if not Path(config).is_file():
        raise ValueError(f"--config {config}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    return GLMConfig.from_file(config)


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

    For the original GLM-130B checkpoint: `load(path, "glm-130b", tokenizer_type="icetk")`.
    """
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags every command line shares; `load_from_args` reads them."""
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", default=str(DEFAULT_MODEL), help="checkpoint folder (original layout)")
    model.add_argument(
        "--config",
        help="run config: a preset of configs/ (glm-130b, glm-130b-int4, ...) or a YAML file, whose keys "
        "are defaults for these flags; or a model-shape JSON file or preset",
    )
    model.add_argument(
        "--tokenizer",
        help="sentencepiece model file; with --tokenizer-type icetk, the path of ice_text.model",
    )
    model.add_argument(
        "--tokenizer-type",
        choices=["icetk", "sentencepiece"],
        help="icetk: GLM-130B's (ice_text.model, default in ~/.icetk_models); default: the checkpoint's",
    )
    model.add_argument(
        "--dtype", help="auto (float32 on CPU, float16 on GPU), float32, bfloat16 or float16 (default: auto)"
    )
    model.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    add_offload_arguments(parser)


def load_from_args(args: argparse.Namespace) -> tuple[GLM, GLMTokenizer]:
    run = apply_run_config(args)  # flags left unset take the run config's values
    args.dtype, args.device = args.dtype or "auto", args.device or "cpu"
    device = torch.device(args.device)
    offload = offload_from_args(args, device, resolve_dtype(args.dtype, device))
    return load(
        args.checkpoint, run.model, args.tokenizer, args.tokenizer_type, args.dtype, device, [offload]
    )


def run_cli(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> None:
    """Run a command line's main: a user error becomes one `error: ...` line and exit status 2."""
    try:
        sys.exit(main(args))
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
