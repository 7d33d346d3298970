"""The offload planner: which of the blocks' weight matrices stay resident under a budget and which stream,
counted from the (meta) model's own tensors."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from glm.sizes import format_bytes, parse_memory

# The blocks' submodules that are streamed, each a unit of its own, in forward order.
STREAMED_MODULES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
DEFAULT_BUFFERS = 2
SLOT_ALIGN = 4096  # each tensor in a buffer starts and ends on this boundary (direct I/O needs it)


class OffloadError(ValueError):
    """A budget the model cannot run under; the message names the minimum."""


def tensor_bytes(tensor: Tensor, dtype: torch.dtype) -> int:
    """Bytes a (meta) tensor will take once loaded: floating parameters in `dtype`; buffers (quantized
    layers' weights and scales, which keep their own dtypes) and integer tensors as they are."""
    cast = isinstance(tensor, nn.Parameter) and tensor.is_floating_point()
    return tensor.numel() * (dtype.itemsize if cast else tensor.element_size())


def laid_out_for(model: nn.Module, device: torch.device, fused_int4: bool | None = None) -> nn.Module:
    """The (meta) model as loading for `device` leaves it, to count: a copy in which every module with a
    `prepare(device, fused_int4)` hook (a quantized layer) has laid out its tensors for the device's
    kernel (INT4 on CUDA sm_80+: tinygemm's packed form), or the model itself off CUDA or without such
    modules. `fused_int4` None asks the device whether it runs the fused INT4 kernel."""
    prepared = [m for m in model.modules() if hasattr(m, "prepare")]
    if device.type != "cuda" or not prepared:
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "prepare"):
            module.prepare(device, fused_int4)
    return model


def aligned(n: int, alignment: int) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return (n + alignment - 1) // alignment * alignment


def local_tensors(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, name) of every parameter and buffer of a module and its submodules."""
    return [
        (owner, name)
        for owner in module.modules()
        for name in [*owner._parameters, *owner._buffers]
        if getattr(owner, name) is not None
    ]


def streamable_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules offload may stream, in forward order, with their names."""
    return [
        (f"transformer.layers.{i}.{path}", layer.get_submodule(path))
        for i, layer in enumerate(model.transformer.layers)
        for path in STREAMED_MODULES
    ]


def unit_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of one unit as laid out in a streaming buffer."""
    return sum(aligned(tensor_bytes(getattr(o, n), dtype), SLOT_ALIGN) for o, n in local_tensors(module))


@dataclass(frozen=True)
class OffloadPlan:
    """Which units stay resident under a budget, from the (meta) model's own tensors."""

    max_memory: int | None
    total_bytes: int  # all weights
    fixed_bytes: int  # always resident: embedding, LayerNorms, anything outside the streamable units
    resident_units: tuple[str, ...]
    streamed_units: tuple[str, ...]
    resident_bytes: int  # all resident weights, fixed included
    streamed_bytes: int  # read per forward pass
    buffer_bytes: int  # the streaming buffers
    buffers: int  # their number

    @property
    def device_bytes(self) -> int:
        """Weights on the compute device: resident ones plus the buffers."""
        return self.resident_bytes + self.buffer_bytes

    @property
    def streamed_layers(self) -> int:
        """How many layers have at least one streamed matrix."""
        return len({name.split(".")[2] for name in self.streamed_units})


def plan_offload(
    model: nn.Module, max_memory: str | int | None, dtype: torch.dtype, buffers: int = DEFAULT_BUFFERS
) -> OffloadPlan:
    """Keep the fixed weights and then units in forward order while they fit in `max_memory` together with
    `buffers` streaming buffers; stream the rest. No budget, or one the whole model fits in, streams
    nothing. More buffers fetch further ahead (steadier reads when the CPU is busy) but keep less resident."""
    units = streamable_units(model)
    sizes = [unit_bytes(m, dtype) for _, m in units]
    total = sum(tensor_bytes(t, dtype) for t in [*model.parameters(), *model.buffers()])
    streamable = sum(tensor_bytes(getattr(o, n), dtype) for _, m in units for o, n in local_tensors(m))
    fixed = total - streamable
    names = tuple(name for name, _ in units)
    budget = None if max_memory is None else parse_memory(max_memory, total)
    if budget is None or budget >= total:
        return OffloadPlan(budget, total, fixed, names, (), total, 0, 0, 0)
    if buffers < 2:
        raise ValueError(f"offload needs at least 2 streaming buffers, got {buffers}")
    count, buffers = buffers, buffers * max(sizes)
    room = budget - fixed - buffers
    if room < 0:
        raise OffloadError(
            f"--max-memory {format_bytes(budget)} is below the minimum for streaming this model: "
            f"{format_bytes(fixed + buffers)} ({format_bytes(fixed)} embedding and LayerNorms stay resident, "
            f"plus {count} buffers of {format_bytes(max(sizes))}); raise it or quantize"
        )
    resident = 0
    while resident < len(units) and sizes[resident] <= room:
        room -= sizes[resident]
        resident += 1
    streamed = [o_n for _, m in units[resident:] for o_n in local_tensors(m)]
    streamed_bytes = sum(tensor_bytes(getattr(o, n), dtype) for o, n in streamed)
    return OffloadPlan(
        budget,
        total,
        fixed,
        names[:resident],
        names[resident:],
        total - streamed_bytes,
        streamed_bytes,
        buffers if resident < len(units) else 0,
        count if resident < len(units) else 0,
    )
