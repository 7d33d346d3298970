"""The offload transform: plans the budget on the meta model and attaches a `WeightStreamer` with the store
for the device (a no-op when off or when everything fits)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from glm.offload.planner import DEFAULT_BUFFERS, OffloadError, laid_out_for, plan_offload
from glm.offload.stores import DiskStore, PinnedStore, keep_large_allocations_returnable
from glm.offload.streamer import WeightStreamer
from glm.sizes import parse_memory


class Offload:
    """The offload transform: `Offload("22GiB", device, dtype)(meta_model)`. `max_memory` None: a no-op."""

    def __init__(
        self,
        max_memory: str | int | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        folder: str | Path | None = None,
        drop_page_cache: bool = True,
        buffers: int = DEFAULT_BUFFERS,
    ) -> None:
        self.max_memory, self.device, self.dtype = max_memory, torch.device(device), dtype
        self.folder, self.drop_page_cache, self.buffers = folder, drop_page_cache, buffers

    def __call__(self, model: nn.Module) -> nn.Module:
        if self.max_memory is None:
            return model
        # Counted as loading leaves the layers (a packed INT4 weight's scales take more room); the units
        # planned are the same modules of `model`.
        plan = plan_offload(laid_out_for(model, self.device), self.max_memory, self.dtype, self.buffers)
        if not plan.streamed_units:
            return model
        if self.device.type == "cuda":
            store: DiskStore | PinnedStore = PinnedStore(self.device, plan.buffers)
        elif self.device.type == "cpu":
            store = DiskStore(self.folder, self.drop_page_cache)
            keep_large_allocations_returnable()
        else:
            raise OffloadError(f"offload supports cpu and cuda devices, not {self.device}")
        model.offload = WeightStreamer(model, plan, self.device, store)
        return model


def offload_from_args(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Offload:
    """The transform for `--max-memory` and `--offload-folder` (flags of glm.cli.common)."""
    max_memory = getattr(args, "max_memory", None)
    if max_memory is not None:
        parse_memory(max_memory, 1)  # reject a malformed size before anything loads
    return Offload(max_memory, device, dtype, getattr(args, "offload_folder", None))
