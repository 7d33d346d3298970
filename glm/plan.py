"""Will it fit? Per-rank memory of a run, computed from the model the run would build.

    python -m glm.plan --config glm-130b-int4 --device-memory 24GiB
    python -m glm.plan --config glm-130b --tensor-parallel-size 4 --quantization-bit-width 4 \\
        --device-memory 24GiB [--batch-size 1 --max-length 2048 --max-memory 20GiB]
    python -m glm.plan --hardware-table        # the original README's hardware table, checked

The model is built on the meta device and transformed as the run would be (tensor parallelism, then
quantization, then offload), so the numbers follow the code rather than a formula beside it:

- weights: every parameter and buffer of one rank's model, by kind, floating parameters in the run's dtype,
  laid out as loading leaves them: on CUDA, INT4 layers hold tinygemm's packed weight and bf16 (scale, zero)
  pairs per kernel group (sm_80+ assumed; a V100 or RTX 2080 Ti keeps the stored bytes, ~3 % less);
- KV cache: `KVCache.for_model` on that model (batch x beams rows, max-length tokens);
- activation peak: the largest sum of live tensors while the model runs a prefill of max-length tokens and a
  decode step over a full cache, on meta tensors, tracked op by op (inputs and mask included);
- workspace: a fixed allowance on CUDA for the context, cuBLAS and NCCL (an estimate, not measured).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from glm.checkpoint import read_metadata
from glm.cli.plan import build_parser
from glm.config import GLMConfig
from glm.loading import resolve_dtype
from glm.model import GLM, KVCache
from glm.offload import (
    OffloadError,
    OffloadPlan,
    format_bytes,
    laid_out_for,
    parse_memory,
    plan_offload,
    tensor_bytes,
)
from glm.run_config import load_run_config

GB = 1000**3
GIB = 1024**3
# CUDA context (~0.3-0.5 GiB), cuBLAS workspaces and NCCL buffers under tensor parallelism. An estimate.
CUDA_WORKSPACE = 1 * GIB

Transform = Callable[[GLM], GLM]


class _MetaAllGather:
    """The all-gather's memory on one process: the N received parts and their concatenation."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([torch.empty_like(x) for _ in range(self.world_size)], dim=-1)


def _identity(x: Tensor) -> Tensor:  # an in-place all-reduce allocates nothing
    return x


def _dequantizing_kernel(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """A quantized matmul's memory at its worst (prefill): the dequantised weight, then a dense matmul."""
    dense = torch.empty(weight.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    return F.linear(x, dense)


def run_transforms(tensor_parallel_size: int, bits: int | None) -> list[Transform]:
    """The transforms a run applies before offload, in the load pipeline's order, for rank 0 (every rank
    has the same shapes), with the collectives replaced by single-process stand-ins of equal memory so
    the model runs on the meta device."""
    from glm.tensor_parallel import apply_tensor_parallel

    def shard(model: GLM) -> GLM:
        apply_tensor_parallel(model, 0, tensor_parallel_size)
        if tensor_parallel_size > 1:
            for module in model.modules():
                for seam in ("reduce", "enter"):  # enter: the identity forward, an all-reduce backward
                    if getattr(module, seam, None) is not None:
                        setattr(module, seam, _identity)
            model.output_layer.gather = _MetaAllGather(tensor_parallel_size)
        return model

    transforms = [shard]
    if bits is not None:
        from glm.quantize import quantization_transform

        transforms.append(quantization_transform(bits))
    return transforms


def _run_on_meta(model: GLM) -> GLM:
    """Quantized layers (quantization.layers.QuantizedLinear) compute with the dequantizing stand-in."""
    for module in model.modules():
        set_kernel = getattr(module, "set_kernel", None)
        if set_kernel is not None:
            set_kernel(_dequantizing_kernel)
    return model


@functools.lru_cache(maxsize=4)
def _plain_meta_model(config: GLMConfig) -> GLM:
    with torch.device("meta"):
        return GLM(config)


def build_meta_model(config: GLMConfig, transforms: Sequence[Transform]) -> GLM:
    """The model built on the meta device, transformed as a run transforms it."""
    model = copy.deepcopy(_plain_meta_model(config))
    for transform in transforms:
        model = transform(model)
    return model


def weight_kind(name: str) -> str:
    """A tensor's kind in the report, from its state-dict name."""
    if "word_embeddings" in name:
        return "embedding"
    if "layernorm" in name:
        return "layernorm"
    if name.endswith("bias"):
        return "bias"
    if name.endswith("_scale"):
        return "scale"
    return "attention" if ".attention." in name else "mlp"


def weights_by_kind(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the model's parameters and buffers by `weight_kind`, floating tensors in `dtype`."""
    kinds: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        kind = weight_kind(name)
        kinds[kind] = kinds.get(kind, 0) + tensor_bytes(tensor, dtype)
    return kinds


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the tensors the ops create (views and in-place results excluded) while alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def add(self, tensor: Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, tuple | list) else (out,)
        for ret, value in zip(func._schema.returns, results, strict=False):
            if isinstance(value, Tensor) and ret.alias_info is None:
                self.add(value)
        return out


def activation_peak(model: GLM, cache: KVCache, rows: int, length: int, dtype: torch.dtype) -> int:
    """Peak bytes of live tensors besides weights and cache: a prefill of `length` - 1 tokens (logits at
    the last one, as generation does), then a decode step that fills the cache."""
    device = torch.device("meta")
    peak = 0
    for s, start in ((length - 1, 0), (1, length - 1)):
        with _LiveBytes() as tracker, torch.no_grad():
            ids = torch.zeros(rows, s, dtype=torch.long, device=device)
            positions = torch.zeros(rows, s, dtype=torch.long, device=device)
            mask = torch.zeros(rows, 1, length, length, dtype=torch.bool, device=device)  # the whole run's
            cache.length = start
            logits_at = torch.zeros(rows, 1, dtype=torch.long, device=device) if s > 1 else None
            model(ids, positions, mask[:, :, start : start + s, : start + s], cache, logits_at)
        peak = max(peak, tracker.peak)
    return peak


def _cache_bytes(model: GLM, dtype: torch.dtype, rows: int, length: int) -> int:
    model.to(dtype)  # floating tensors (meta: no memory), so the cache takes the run's dtype
    model.compute_device = torch.device("meta")
    cache = KVCache.for_model(model, rows, length)
    return sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v])


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """One rank's memory, in bytes."""

    weights: dict[str, int]
    kv_cache: int
    activations: int
    workspace: int
    offload: OffloadPlan
    device_memory: int | None

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def device_weights(self) -> int:
        """Weights on the device: all of them, or under offload the resident ones and the buffers."""
        return self.offload.device_bytes if self.offload.streamed_units else self.weight_bytes

    @property
    def total(self) -> int:
        return self.device_weights + self.kv_cache + self.activations + self.workspace

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.total <= self.device_memory


def plan_memory(
    config: GLMConfig,
    tensor_parallel_size: int = 1,
    bits: int | None = None,
    dtype: torch.dtype = torch.float16,
    device_type: str = "cuda",
    batch_size: int = 1,
    num_beams: int = 1,
    max_length: int | None = None,
    max_memory: str | int | None = None,
    device_memory: str | int | None = None,
    transforms: Sequence[Transform] | None = None,
) -> MemoryPlan:
    """The memory of one rank of a run; `transforms` default to `run_transforms(...)`."""
    length = max_length or config.max_sequence_length
    if transforms is None:
        transforms = run_transforms(tensor_parallel_size, bits)
    model = laid_out_for(build_meta_model(config, transforms), torch.device(device_type), fused_int4=True)
    weights = weights_by_kind(model, dtype)
    offload = plan_offload(model, max_memory, dtype)
    rows = batch_size * num_beams
    kv = _cache_bytes(model, dtype, rows, length)
    # Activations do not accumulate across layers (each block hands one hidden state to the next), so two
    # layers give the peak of all of them, in a fraction of the time meta ops take.
    small = build_meta_model(dataclasses.replace(config, num_layers=min(2, config.num_layers)), transforms)
    _run_on_meta(small).to(dtype)
    small.compute_device = torch.device("meta")
    activations = activation_peak(small, KVCache.for_model(small, rows, length), rows, length, dtype)
    workspace = CUDA_WORKSPACE if device_type == "cuda" else 0
    memory = None if device_memory is None else parse_memory(device_memory)
    return MemoryPlan(weights, kv, activations, workspace, offload, memory)


def offload_needed(plan_args: dict, base: MemoryPlan) -> MemoryPlan | None:
    """The plan with the largest --max-memory that leaves room for the cache, activations and workspace of
    `base` (the plan of `plan_args` without offload, on a device of known memory), or None if even the
    minimum streaming setup does not fit."""
    device_memory = base.device_memory
    assert device_memory is not None
    budget = device_memory - base.kv_cache - base.activations - base.workspace
    try:
        plan = plan_memory(**{**plan_args, "max_memory": max(budget, 0), "device_memory": device_memory})
    except OffloadError:
        return None
    return plan if plan.fits else None


# The original README's hardware table: (hardware, GPUs, GPU memory, quantization bits, weight offload).
ORIGINAL_HARDWARE = [
    ("8 x A100", 8, "40GiB", None, False),
    ("8 x V100", 8, "32GiB", None, True),
    ("8 x V100", 8, "32GiB", 8, False),
    ("8 x RTX 3090", 8, "24GiB", 8, False),
    ("4 x RTX 3090", 4, "24GiB", 4, False),
    ("8 x RTX 2080 Ti", 8, "11GiB", 4, False),
]
V100_OFFLOAD_BUDGET = "25GiB"  # the original's --bminf-memory-limit 25, as configs/glm-130b-v100.yaml


def hardware_table(config: GLMConfig, batch_size: int = 1, max_length: int | None = None) -> list[dict]:
    """Each row of the original's table planned: does it fit without offload, and with it when offloaded."""
    rows = []
    for hardware, gpus, memory, bits, offloaded in ORIGINAL_HARDWARE:
        args = dict(
            config=config, tensor_parallel_size=gpus, bits=bits, batch_size=batch_size, max_length=max_length
        )
        plain = plan_memory(**args, device_memory=memory)
        with_offload = (
            plan_memory(**args, device_memory=memory, max_memory=V100_OFFLOAD_BUDGET) if offloaded else None
        )
        rows.append(
            dict(
                hardware=hardware,
                memory=memory,
                bits=bits,
                offload=offloaded,
                plain=plain,
                with_offload=with_offload,
            )
        )
    return rows


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def describe(plan: MemoryPlan, config: GLMConfig) -> str:
    """The report `python -m glm.plan` prints for one plan."""
    lines = ["per rank:"]
    for kind, n in sorted(plan.weights.items(), key=lambda kv: -kv[1]):
        lines.append(f"  weights {kind:<10} {_gb(n):>12}")
    lines.append(f"  weights total      {_gb(plan.weight_bytes):>12}")
    if plan.offload.streamed_units:
        o = plan.offload
        matrices = len(o.resident_units) + len(o.streamed_units)
        lines.append(
            f"  offload: {len(o.streamed_units)} of {matrices} matrices ({o.streamed_layers} of "
            f"{config.num_layers} layers) stream, {_gb(o.streamed_bytes)} per forward; on the device "
            f"{_gb(o.resident_bytes)} resident + {_gb(o.buffer_bytes)} buffers"
        )
    lines.append(f"  KV cache           {_gb(plan.kv_cache):>12}")
    lines.append(f"  activation peak    {_gb(plan.activations):>12}")
    lines.append(f"  workspace          {_gb(plan.workspace):>12}")
    lines.append(f"  total              {_gb(plan.total):>12}")
    if plan.device_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(
            f"{verdict} in {format_bytes(plan.device_memory)} ({_gb(plan.device_memory)}) per device"
        )
    return "\n".join(lines)


def format_hardware_table(rows: list[dict]) -> str:
    """`hardware_table`'s rows as the Markdown table `--hardware-table` prints."""
    out = [
        "| Hardware | GPU memory | Quantization | Offload (original) | weights / GPU | total / GPU "
        "| planner says |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        plain, off = row["plain"], row["with_offload"]
        if plain.fits:
            verdict = "fits"
        elif off is not None and off.fits:
            verdict = f"needs offload; fits with --max-memory {V100_OFFLOAD_BUDGET} ({_gb(off.total)})"
        else:
            verdict = "does not fit"
        quant = f"INT{row['bits']}" if row["bits"] else "FP16"
        out.append(
            f"| {row['hardware']} | {row['memory'].replace('GiB', ' GB')} | {quant} | "
            f"{'Yes (BMInf)' if row['offload'] else 'No'} | {_gb(plain.weight_bytes)} | {_gb(plain.total)} | "
            f"{verdict} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m glm.plan`: 0 when the run fits, 1 when it does not, 2 for a bad argument."""
    args = build_parser().parse_args(argv)
    try:
        run = load_run_config(args.config)
        config = run.model
        if config is None and run.checkpoint is not None:  # the shape stored with the checkpoint
            meta = read_metadata(Path(run.checkpoint)) or {}
            config = GLMConfig.from_dict(meta["model"]) if "model" in meta else None
        if config is None:
            raise ValueError(f"--config {args.config} names no model shape and no checkpoint that stores one")
        if args.hardware_table:
            print(format_hardware_table(hardware_table(config, args.batch_size, args.max_length)))
            return 0
        device_type = args.device_type or ("cuda" if (run.device or "cpu").startswith("cuda") else "cpu")
        dtype = resolve_dtype(args.dtype or run.dtype, torch.device(device_type))
        plan_args = dict(
            config=config,
            tensor_parallel_size=args.tensor_parallel_size or run.tensor_parallel_size or 1,
            bits=args.quantization_bit_width or run.quantization_bit_width,
            dtype=dtype,
            device_type=device_type,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            max_length=args.max_length,
        )
        max_memory = args.max_memory or run.max_memory
        plan = plan_memory(**plan_args, max_memory=max_memory, device_memory=args.device_memory)
        print(describe(plan, config))
        if not plan.fits and max_memory is None:
            needed = offload_needed(plan_args, plan)
            if needed is None:
                print("does not fit even with offload: quantize, or use more devices")
            else:
                print(f"with offload (--max-memory {format_bytes(needed.offload.max_memory)}):")
                print(describe(needed, config))
        return 0 if plan.fits else 1
    except (ValueError, OffloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
