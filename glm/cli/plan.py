"""The command line of `python -m glm.plan` (no torch: `--help` answers at once)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plan", description="Per-rank memory of a run, and whether it fits."
    )
    parser.add_argument("--config", default="glm-130b", help="run config preset or file (configs/)")
    parser.add_argument("--tensor-parallel-size", type=int, help="default: the config's, else 1")
    parser.add_argument("--quantization-bit-width", type=int, choices=[4, 8], help="default: the config's")
    parser.add_argument("--dtype", help="default: the config's, else auto for the device type")
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu"], help="default: the config's")
    parser.add_argument("--device-memory", help="memory per device, e.g. 24GiB: say whether it fits")
    parser.add_argument("--max-memory", help="offload budget per device (weights), e.g. 20GiB or 50%%")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default: the model's maximum)")
    parser.add_argument("--hardware-table", action="store_true", help="plan the original README's table")
    return parser


def build_finetune_parser() -> argparse.ArgumentParser:
    """`python -m glm.plan_finetune`: the memory of a LoRA or P-tuning v2 fine-tuning run."""
    parser = argparse.ArgumentParser(
        prog="plan_finetune",
        description="Per-rank memory of a LoRA or P-tuning v2 fine-tuning run, with and without gradient "
        "checkpointing.",
    )
    parser.add_argument("--model", default="bundled", help="a model-shape preset (glm-130b) or bundled")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--quantization-bit-width", type=int, choices=[4, 8], help="default: a float base")
    parser.add_argument("--dtype", default="auto", help="base weights' dtype (auto: float16 on CUDA)")
    parser.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument(
        "--targets", nargs="+", default=["attention.query_key_value", "attention.dense"], help="LoRA targets"
    )
    parser.add_argument(
        "--method", default="both", choices=["lora", "ptuning", "both"], help="the adapter(s) planned"
    )
    parser.add_argument("--prefix-length", type=int, default=16, help="P-tuning v2 prefix tokens per layer")
    parser.add_argument(
        "--hardware-table", action="store_true", help="GLM-130B INT8/INT4 on the original's GPUs"
    )
    return parser
