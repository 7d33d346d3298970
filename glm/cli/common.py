"""What every command line shares: the argparse parser whose errors are one line, and the model flags
(`glm.api.load_from_args` reads them). Importing this module does not import torch."""

from __future__ import annotations

import argparse
from typing import NoReturn

from glm.cli.quantization import add_quantization_arguments
from glm.run_config import DEFAULT_MODEL


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser that shows every default in --help and whose errors are one line:
    `error: ... (see PROG --help)`, exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
        help="sentencepiece model file; with --tokenizer-type icetk, the path of ice_text.model "
        "(default: the checkpoint's)",
    )
    model.add_argument(
        "--tokenizer-type",
        choices=["icetk", "sentencepiece"],
        help="icetk: GLM-130B's (ice_text.model, looked for in ~/.icetk_models) (default: the checkpoint's)",
    )
    model.add_argument(
        "--dtype", help="auto (float32 on CPU, float16 on GPU), float32, bfloat16 or float16 (default: auto)"
    )
    model.add_argument(
        "--device", help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N (default: auto)"
    )
    model.add_argument(
        "--adapter",
        help="a LoRA adapter folder written by glm-finetune, applied over the checkpoint it was trained on "
        "(default: none)",
    )
    # glm.distributed's flags (`distributed.session` reads them).
    parallel = parser.add_argument_group(
        "parallelism (launch with torchrun or deepspeed; README: Tensor parallelism and multi-node)"
    )
    parallel.add_argument(
        "--tensor-parallel-size",
        "--model-parallel-size",
        dest="tensor_parallel_size",
        type=int,
        help="processes sharing one model, each holding 1/N of every layer "
        "(default: the world size / the data-parallel size)",
    )
    parallel.add_argument(
        "--distributed-timeout",
        type=float,
        default=600.0,
        help="seconds a rank waits for the others inside the model before the job stops with an error",
    )
    add_quantization_arguments(parser)
    # glm.offload's flags (`offload_from_args` reads them), defined here so parsing needs no torch.
    group = parser.add_argument_group("weight offload")
    group.add_argument(
        "--max-memory",
        help="weights the device may hold (per tensor-parallel rank), e.g. 22GiB or 25%% of the model; "
        "the rest streams from CPU memory (GPU) or from disk (CPU) (default: everything resident)",
    )
    group.add_argument(
        "--offload-folder",
        help="folder for the streamed weights on a CPU-only machine (default: a temporary folder)",
    )
