"""The weight streamer: moves the planned units through the buffers around each one's forward, and routes
their tensors to the store while loading. Attached to the model as `model.offload`."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from glm.loading import assign_weight
from glm.offload.planner import SLOT_ALIGN, OffloadPlan, aligned, local_tensors, streamable_units
from glm.offload.stores import DiskStore, Entry, PinnedStore, Unit, slot_view


def _same(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


class WeightStreamer:
    """Streams the planned units through the buffers; attached to the model as `model.offload`.

    `bytes_streamed` and `wait_seconds` (the compute thread waiting for a unit) add up over the run."""

    def __init__(
        self,
        model: nn.Module,
        plan: OffloadPlan,
        device: torch.device,
        store: DiskStore | PinnedStore,
    ) -> None:
        self.plan, self.device, self.store = plan, device, store
        modules = dict(streamable_units(model))
        self.units = [Unit(name, modules[name]) for name in plan.streamed_units]
        self.buffers: list[Tensor] | None = None
        self.holding: list[int | None] = []  # per buffer: the unit it holds or receives
        self.pending: list[object] = []
        self.bytes_streamed = 0
        self.wait_seconds = 0.0
        for index, unit in enumerate(self.units):
            for owner in unit.module.modules():
                if hasattr(owner, "compute_device"):  # a layer that prepares for its device (quantized)
                    owner.compute_device = device
            self._intercept_loading(unit)
            unit.module.register_forward_pre_hook(lambda _m, _a, i=index: self._before(i))
            unit.module.register_forward_hook(lambda _m, _a, _o, i=index: self._after(i))

    # Loading: each tensor of a streamed unit goes to the store as it arrives, never to the device.
    def _intercept_loading(self, unit: Unit) -> None:
        for owner in unit.module.modules():
            original = getattr(owner, "load_weight", None)

            def load_weight(name, tensor, dtype, device, owner=owner, original=original):
                if original is not None:
                    original(name, tensor, dtype, torch.device("cpu"))
                else:
                    assign_weight(owner, name, tensor, dtype, torch.device("cpu"))
                self._stash(unit)

            owner.load_weight = load_weight
        original_finish = getattr(unit.module, "finish_loading", None)

        def finish_loading() -> None:
            if original_finish is not None:
                original_finish()
            self._stash(unit)
            self.store.seal(unit)  # the unit is complete: the store may now lay it out for good
            unit.bind(lambda e: e.stored)
            for entry in unit.entries:
                self.store.release(entry)

        unit.module.finish_loading = finish_loading

    def _stash(self, unit: Unit) -> None:
        """Move the unit's loaded tensors that the store does not hold yet into it, forget the ones the
        module no longer holds (a quantized layer that packed its weight for the kernel dropped the stored
        one) and lay the rest out one after another in a buffer."""
        current = {(id(e.owner), e.name): e for e in unit.entries}
        held = local_tensors(unit.module)
        unit.entries = [e for e in unit.entries if (e.owner, e.name) in held]
        for owner, name in held:
            value = getattr(owner, name)
            entry = current.get((id(owner), name))
            if value.is_meta or (entry is not None and _same(value, entry.stored)):
                continue
            if entry is not None:
                unit.entries.remove(entry)
            entry = Entry(owner, name, name in owner._parameters, value, 0, 0)
            self.store.put(entry, value.detach().cpu())
            unit.entries.append(entry)
            unit.bind(lambda e: e.stored)
            self.store.release(entry)
        offset = 0
        for entry in unit.entries:
            entry.slot_offset = offset
            offset = aligned(offset + entry.nbytes, SLOT_ALIGN)

    # Running: while unit i computes, units i+1 .. i+B-1 are fetched into the other B-1 buffers.
    def _allocate(self) -> None:
        size = max(u.nbytes for u in self.units)
        self.buffers = [self._aligned_buffer(size) for _ in range(self.plan.buffers)]
        self.holding = [None] * self.plan.buffers
        self.pending = [None] * self.plan.buffers

    def _aligned_buffer(self, size: int) -> Tensor:
        raw = torch.empty(size + SLOT_ALIGN, dtype=torch.uint8, device=self.device)
        skip = -raw.data_ptr() % SLOT_ALIGN
        return raw[skip : skip + size]

    def _fetch(self, index: int, slot: int) -> None:
        if self.pending[slot] is not None:
            self.store.settle(self.pending[slot])
        self.holding[slot] = index
        self.pending[slot] = self.store.fetch(self.units[index], self.buffers[slot], slot)
        self.bytes_streamed += self.units[index].nbytes

    def _before(self, index: int) -> None:
        if self.buffers is None:
            self._allocate()
        n = len(self.units)
        wanted = list(dict.fromkeys((index + k) % n for k in range(len(self.buffers))))
        # Fetches are issued in order (to the disk readers, or on the one copy stream), each into a buffer
        # that holds no unit wanted now; the buffer of the unit that computed last is free again.
        for unit in wanted:
            if unit not in self.holding:
                self._fetch(unit, next(i for i, h in enumerate(self.holding) if h not in wanted))
        slot = self.holding.index(index)
        start = time.perf_counter()
        self.store.wait(self.pending[slot])
        self.wait_seconds += time.perf_counter() - start
        buffer = self.buffers[slot]
        self.units[index].bind(lambda e: slot_view(buffer, e.slot_offset, e.stored))

    def _after(self, index: int) -> None:
        slot = self.holding.index(index)
        self.units[index].bind(lambda e: e.stored)
        self.store.slot_free(slot)
