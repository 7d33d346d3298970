"""The memory of one rank of a LoRA or P-tuning v2 fine-tuning run: `python -m glm.plan_finetune --help`.

Base weights by precision are glm.plan's (the model built on the meta device, transformed as a run
transforms it: tensor parallelism, INT8 / INT4). The adapter is counted from its shapes on that rank (a
LoRA's shards follow its layer's split; a prefix keeps the rank's heads: 2 x layers x N x hidden / TP
values), with its gradient and AdamW's two moments (all fp32). Activations are measured: one forward and
backward pass of a one- and a two-layer meta model with the adapter applied, tracking the live tensors
(glm.plan's tracker), extrapolated to every layer (each block keeps the same tensors for the backward
pass; with gradient checkpointing only its input). Attention is counted as the unfused math path
([b, nh, s, s] scores), as glm.plan does: an upper bound where a fused kernel runs.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F

from glm.adapters.lora import LoRAOptions, apply_lora
from glm.adapters.prefix import PrefixOptions, apply_prefix
from glm.cli.plan import build_finetune_parser
from glm.config import GLMConfig, get_preset
from glm.finetune.loop import enable_gradient_checkpointing
from glm.loading import resolve_dtype
from glm.model import GLM
from glm.plan import (
    CUDA_WORKSPACE,
    ORIGINAL_HARDWARE,
    _LiveBytes,
    _run_on_meta,
    build_meta_model,
    plan_memory,
    run_transforms,
)
from glm.sizes import format_bytes, parse_memory

Options = LoRAOptions | PrefixOptions  # the adapter planned: its options say which method


def _apply(model: GLM, options: Options) -> None:
    if isinstance(options, LoRAOptions):
        apply_lora(model, options)
    else:
        apply_prefix(model, options, initialise=False)  # zeros: shapes are all that count on meta


def describe_options(options: Options) -> str:
    if isinstance(options, LoRAOptions):
        return f"LoRA rank {options.rank} on {', '.join(options.targets)}"
    return f"P-tuning v2, {options.length} prefix tokens"


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
    """One rank's memory, in bytes."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return (
            self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.workspace
        )


def _activation_peak(
    config: GLMConfig,
    layers: int,
    transforms,
    options: Options,
    dtype: torch.dtype,
    rows: int,
    length: int,
    checkpointing: bool,
) -> int:
    model = build_meta_model(dataclasses.replace(config, num_layers=layers), transforms)
    _run_on_meta(model).to(dtype)
    model.compute_device = torch.device("meta")
    _apply(model, options)
    if model.output_layer.gather is not None:  # glm.plan's stand-in, joined to the graph for the backward
        n = model.config.vocab_size // model.transformer.word_embeddings.num_embeddings
        model.output_layer.gather = lambda x: torch.cat([x, *(torch.empty_like(x) for _ in range(n - 1))], -1)
    if checkpointing:
        enable_gradient_checkpointing(model)
    meta = torch.device("meta")
    with _LiveBytes() as tracker:
        ids = torch.zeros(rows, length, dtype=torch.long, device=meta)
        mask = torch.zeros(rows, 1, length, length, dtype=torch.bool, device=meta)
        logits = model(ids, ids, mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
        del logits, loss
    return tracker.peak


def plan_finetune(
    config: GLMConfig,
    options: Options,
    tensor_parallel_size: int = 1,
    bits: int | None = None,
    dtype: torch.dtype = torch.float16,
    device_type: str = "cuda",
    batch_size: int = 1,
    length: int = 512,
    checkpointing: bool = False,
) -> FinetunePlan:
    """The memory of one rank of a fine-tuning run; see the module docstring."""
    transforms = run_transforms(tensor_parallel_size, bits)
    weights = plan_memory(config, tensor_parallel_size, bits, dtype, device_type, max_length=length)
    model = build_meta_model(config, transforms)
    model.compute_device = torch.device("meta")
    _apply(model, options)
    adapter = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # this rank's, fp32
    peaks = [
        _activation_peak(config, n, transforms, options, dtype, batch_size, length, checkpointing)
        for n in (1, 2)
    ]
    # Extrapolated to every layer, the peak holds every layer's adapter gradients: counted apart.
    activations = peaks[0] + (peaks[1] - peaks[0]) * (config.num_layers - 1) - adapter
    return FinetunePlan(
        weights.weight_bytes,
        adapter,
        adapter,
        2 * adapter,
        max(activations, 0),
        CUDA_WORKSPACE if device_type == "cuda" else 0,
    )


def _gb(n: float) -> str:
    return format_bytes(n)


def describe(plan: FinetunePlan) -> str:
    parts = [
        ("base weights", plan.weights),
        ("adapter", plan.adapter),
        ("adapter gradients", plan.gradients),
        ("AdamW state", plan.optimizer),
        ("activations", plan.activations),
        ("workspace", plan.workspace),
    ]
    return "\n".join(
        [*(f"  {name:<18} {_gb(n):>10}" for name, n in parts), f"  {'total':<18} {_gb(plan.total):>10}"]
    )


def short_name(options: Options) -> str:
    return f"LoRA r{options.rank}" if isinstance(options, LoRAOptions) else f"P-tuning v2, N={options.length}"


def hardware_rows(config: GLMConfig, options: Options, length: int, batch_size: int = 1) -> list[str]:
    """Markdown rows: the original README's GPUs (INT8 / INT4 rows) fine-tuning GLM-130B with `options`'
    adapter, with and without gradient checkpointing."""
    rows = []
    for hardware, gpus, memory, bits, _ in ORIGINAL_HARDWARE:
        if bits is None:
            continue
        plans = [
            plan_finetune(
                config, options, gpus, bits, torch.float16, "cuda", batch_size, length, checkpointing=c
            )
            for c in (False, True)
        ]
        fits = ["yes" if p.total <= parse_memory(memory) else "no" for p in plans]
        rows.append(
            f"| {hardware} | INT{bits} | {short_name(options)} | {memory} | {_gb(plans[0].weights)} | "
            f"{_gb(plans[0].adapter * 4)} | {_gb(plans[0].activations)} ({fits[0]}) | "
            f"{_gb(plans[1].activations)} ({fits[1]}) |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_finetune_parser().parse_args(argv)
    methods: list[Options] = []
    if args.method in ("lora", "both"):
        methods.append(LoRAOptions(args.rank, 2.0 * args.rank, 0.0, tuple(args.targets)))
    if args.method in ("ptuning", "both"):
        methods.append(PrefixOptions(args.prefix_length))
    config = get_preset(args.model) if args.model != "bundled" else None
    if config is None:
        from glm.checkpoint import read_metadata
        from glm.run_config import DEFAULT_MODEL

        config = GLMConfig.from_dict(read_metadata(DEFAULT_MODEL)["model"])
    if args.hardware_table:
        print(
            "| hardware | base | adapter | GPU memory | base weights / GPU | adapter + grads + AdamW / GPU | "
            "activations (fits) | with checkpointing (fits) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for options in methods:
            print("\n".join(hardware_rows(config, options, args.length, args.batch_size)))
        return 0
    dtype = resolve_dtype(args.dtype, torch.device(args.device_type))
    for options in methods:
        for checkpointing in (False, True):
            plan = plan_finetune(
                config,
                options,
                args.tensor_parallel_size,
                args.quantization_bit_width,
                dtype,
                args.device_type,
                args.batch_size,
                args.length,
                checkpointing,
            )
            which = "with" if checkpointing else "without"
            print(f"{describe_options(options)}, {which} gradient checkpointing:")
            print(describe(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
