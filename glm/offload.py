"""Weight offload under a memory budget: a transform of the meta model, a no-op when off.

`Offload(max_memory, device, dtype)` is the last load transform (after tensor parallelism and
quantization), so it sees each rank's own, possibly quantized, modules and budgets per rank. It keeps
resident on the compute device the embedding (tied to the output layer), the LayerNorms and as many of the
blocks' weight matrices (`query_key_value`, `attention.dense`, `dense_h_to_4h`, `dense_4h_to_h`, each with
everything it holds: weight, bias, quantization scales, packed bytes) as fit, layer by layer from the first,
and streams the rest, one matrix at a time, through buffers the size of the largest one (two by default):
while one matrix computes, the next ones are copied into the other buffers.

- On CUDA the streamed matrices live in pinned CPU memory and are copied on a second stream.
- On a CPU-only machine they are written once, while loading, to a file in an offload folder (the compute
  dtype, or the packed quantized bytes) and read back by a background thread with `pread`; the pages are
  dropped from the page cache after each read, so neither the process nor the page cache holds more than
  the budget (each token reads the streamed weights from disk).

The budget (`--max-memory`) counts weights only: the resident ones plus the buffers. The KV cache and
activations come on top (`python -m glm.plan` adds them up). Outputs are bit-identical to a run without
offload: the same bytes reach the same kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import mmap
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from glm.loading import assign_weight

# The blocks' submodules that are streamed, each a unit of its own, in forward order.
STREAMED_MODULES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
DEFAULT_BUFFERS = 2
READERS = 4  # disk reads in flight
READ_CHUNK = 8 * 2**20
_PAGE = mmap.PAGESIZE
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_SLOT_ALIGN = 4096  # each tensor in a buffer starts and ends on this boundary (direct I/O needs it)
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_UNITS |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class OffloadError(ValueError):
    """A budget the model cannot run under; the message names the minimum."""


def parse_memory(text: str | int, total: int | None = None) -> int:
    """Bytes from '22GiB', '22GB', '500MiB', '1e9' or an int; '25%' is a share of `total`."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().replace(" ", "")
    if value.endswith("%"):
        if total is None:
            raise ValueError(f"memory '{text}': a percentage needs the model's size")
        return int(float(value[:-1]) / 100 * total)
    match = re.fullmatch(r"([0-9.e+]+)([kmgt]i?b|b)?", value)
    if not match:
        raise ValueError(f"memory '{text}' is not a size: write e.g. 22GiB, 500MB or 25%")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def tensor_bytes(tensor: Tensor, dtype: torch.dtype) -> int:
    """Bytes a (meta) tensor will take once loaded: floating tensors in `dtype`, others as they are."""
    size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * size


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _local_tensors(module: nn.Module) -> list[tuple[nn.Module, str]]:
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
    return sum(_aligned(tensor_bytes(getattr(o, n), dtype), _SLOT_ALIGN) for o, n in _local_tensors(module))


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
    streamable = sum(tensor_bytes(getattr(o, n), dtype) for _, m in units for o, n in _local_tensors(m))
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
    streamed = [o_n for _, m in units[resident:] for o_n in _local_tensors(m)]
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


@dataclass
class _Entry:
    """One tensor of a streamed unit: where it sits in a buffer and in the store."""

    owner: nn.Module
    name: str
    is_parameter: bool
    stored: Tensor  # the store's copy: a file-backed view (disk) or pinned memory (CUDA)
    slot_offset: int
    nbytes: int
    file_offset: int = -1
    mapping: mmap.mmap | None = None


class _Unit:
    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.entries: list[_Entry] = []

    @property
    def nbytes(self) -> int:
        return max((e.slot_offset + _aligned(e.nbytes, _SLOT_ALIGN) for e in self.entries), default=0)

    def bind(self, views: Callable[[_Entry], Tensor]) -> None:
        for entry in self.entries:
            value = views(entry)
            if entry.is_parameter:
                entry.owner._parameters[entry.name] = nn.Parameter(value, requires_grad=False)
            else:
                entry.owner._buffers[entry.name] = value


def _view(buffer: Tensor, offset: int, like: Tensor) -> Tensor:
    return buffer[offset : offset + like.numel() * like.element_size()].view(like.dtype).view(like.shape)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _memoryview(tensor: Tensor, offset: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr() + offset)).cast("B")


class DiskStore:
    """Streamed tensors in one file of an offload folder, read back with pread by background threads."""

    def __init__(self, folder: str | Path | None, drop_page_cache: bool = True) -> None:
        kind = _filesystem(Path(folder or tempfile.gettempdir()))
        if kind in ("tmpfs", "ramfs"):
            raise OffloadError(
                f"offload folder {folder or tempfile.gettempdir()} is on {kind}, which lives in memory: give "
                "--offload-folder a folder on a disk"
            )
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="glm-offload-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        else:
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="weights-", suffix=".bin", dir=self.folder)
        self.path = Path(path)
        self.fd = fd
        weakref.finalize(self, _close_and_remove, fd, self.path)
        self.size = 0
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.pool = concurrent.futures.ThreadPoolExecutor(READERS, thread_name_prefix="glm-offload")
        self._direct: int | None = None

    def put(self, entry: _Entry, value: Tensor) -> None:
        """Append `value` to the file; entry.stored becomes a read-only file-backed view of it."""
        value = value.contiguous()
        offset, n = self.size, value.numel() * value.element_size()
        view = _memoryview(value, 0, n) if n else b""
        written = 0
        while written < n:
            written += os.pwrite(self.fd, view[written:], offset + written)
        self.size = _aligned(offset + n, _PAGE)
        if n:
            os.ftruncate(self.fd, self.size)
            entry.mapping = mmap.mmap(self.fd, _aligned(n, _PAGE), offset=offset, access=mmap.ACCESS_COPY)
            raw = torch.frombuffer(entry.mapping, dtype=torch.uint8, count=n)
            entry.stored = raw.view(value.dtype).view(value.shape)
        else:
            entry.stored = value
        entry.file_offset, entry.nbytes = offset, n

    def release(self, entry: _Entry) -> None:
        """Drop the pages of an entry's file-backed view (after a module's finish_loading touched them)."""
        if entry.mapping is not None and hasattr(entry.mapping, "madvise"):
            entry.mapping.madvise(mmap.MADV_DONTNEED)
        if self.drop_page_cache and entry.nbytes:
            os.posix_fadvise(self.fd, entry.file_offset, entry.nbytes, os.POSIX_FADV_DONTNEED)

    def _direct_fd(self) -> int | None:
        """A second descriptor with O_DIRECT: reads go from the disk straight into the buffer, without the
        page cache or a kernel copy (so the reading thread needs almost no CPU). None where unsupported."""
        if self._direct is None:
            try:
                self._direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                weakref.finalize(self, os.close, self._direct)
            except (AttributeError, OSError):
                self._direct = -1
        return self._direct if self._direct >= 0 else None

    def _read_range(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at {offset + done}")
            done += got

    def fetch(self, unit: _Unit, slot: Tensor, slot_index: int) -> list[concurrent.futures.Future]:
        """Read a unit into a buffer in READ_CHUNK pieces, READERS at a time: several requests in flight
        keep the disk busy while a reading thread waits to be scheduled on a busy CPU."""
        direct = self._direct_fd() if slot.data_ptr() % _SLOT_ALIGN == 0 else None
        fd = self.fd if direct is None else direct
        pieces = []
        for entry in unit.entries:
            # Direct reads cover whole blocks: the entry's file range and its buffer range are both padded.
            n = _aligned(entry.nbytes, _SLOT_ALIGN) if direct is not None else entry.nbytes
            for start in range(0, n, READ_CHUNK):
                view = _memoryview(slot, entry.slot_offset + start, min(READ_CHUNK, n - start))
                pieces.append(self.pool.submit(self._read_range, fd, view, entry.file_offset + start))
            if direct is None and self.drop_page_cache:
                pieces.append(self.pool.submit(self._drop, entry))
        return pieces

    def _drop(self, entry: _Entry) -> None:
        os.posix_fadvise(self.fd, entry.file_offset, entry.nbytes, os.POSIX_FADV_DONTNEED)

    def wait(self, pending: list[concurrent.futures.Future]) -> None:
        for piece in pending:
            piece.result()

    settle = wait  # before a buffer is refilled: its previous reads must be over (several readers)

    def slot_free(self, slot_index: int) -> None:  # the compute thread waits for a unit before using it
        pass


def _filesystem(folder: Path) -> str | None:
    """The file system type of the mount holding `folder` (Linux), or None when unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    folder = folder.resolve()
    best = max((m for m in mounts if folder.is_relative_to(m[0])), key=lambda m: len(m[0]), default=None)
    return None if best is None else best[1]


def _keep_large_allocations_returnable() -> None:
    """Make glibc serve every large allocation with its own mapping. By default, once a large block is
    freed, glibc raises its threshold and serves blocks up to that size from the heap, which is rarely
    returned to the system: streaming's loading frees one cast tensor per weight and would leave the heap
    holding tens of MiB beyond the budget."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def _close_and_remove(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    path.unlink(missing_ok=True)


class PinnedStore:
    """Streamed tensors in pinned CPU memory, copied to the GPU on a copy stream."""

    def __init__(self, device: torch.device, buffers: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in range(buffers)]
        self.free = [torch.cuda.Event() for _ in range(buffers)]

    def put(self, entry: _Entry, value: Tensor) -> None:
        pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        pinned.copy_(value)
        entry.stored, entry.nbytes = pinned, pinned.numel() * pinned.element_size()

    def release(self, entry: _Entry) -> None:
        pass

    def fetch(self, unit: _Unit, slot: Tensor, slot_index: int) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[slot_index])
            for entry in unit.entries:
                _view(slot, entry.slot_offset, entry.stored).copy_(entry.stored, non_blocking=True)
            self.ready[slot_index].record(self.stream)
        return self.ready[slot_index]

    def wait(self, pending: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(pending)

    def slot_free(self, slot_index: int) -> None:
        self.free[slot_index].record(torch.cuda.current_stream(self.device))

    def settle(self, pending: torch.cuda.Event) -> None:  # copies into a buffer run in stream order
        pass


class WeightStreamer:
    """Streams the planned units through the buffers; attached to the model as `model.offload`."""

    def __init__(
        self,
        model: nn.Module,
        plan: OffloadPlan,
        device: torch.device,
        store: DiskStore | PinnedStore,
    ) -> None:
        self.plan, self.device, self.store = plan, device, store
        modules = dict(streamable_units(model))
        self.units = [_Unit(name, modules[name]) for name in plan.streamed_units]
        self.buffers: list[Tensor] | None = None
        self.holding: list[int | None] = []  # per buffer: the unit it holds or receives
        self.pending: list[object] = []
        self.bytes_streamed = 0
        self.wait_seconds = 0.0
        for index, unit in enumerate(self.units):
            self._intercept_loading(unit)
            unit.module.register_forward_pre_hook(lambda _m, _a, i=index: self._before(i))
            unit.module.register_forward_hook(lambda _m, _a, _o, i=index: self._after(i))

    # Loading: each tensor of a streamed unit goes to the store as it arrives, never to the device.
    def _intercept_loading(self, unit: _Unit) -> None:
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
            for entry in unit.entries:
                self.store.release(entry)

        unit.module.finish_loading = finish_loading

    def _stash(self, unit: _Unit) -> None:
        """Move the unit's loaded tensors that the store does not hold yet into it."""
        current = {(id(e.owner), e.name): e for e in unit.entries}
        for owner, name in _local_tensors(unit.module):
            value = getattr(owner, name)
            entry = current.get((id(owner), name))
            if value.is_meta or (entry is not None and _same(value, entry.stored)):
                continue
            if entry is not None:
                unit.entries.remove(entry)
            entry = _Entry(owner, name, name in owner._parameters, value, 0, 0)
            self.store.put(entry, value.detach().cpu())
            entry.slot_offset = _aligned(unit.nbytes, _SLOT_ALIGN)
            unit.entries.append(entry)
            unit.bind(lambda e: e.stored)
            self.store.release(entry)

    # Running: while unit i computes, units i+1 .. i+B-1 are fetched into the other B-1 buffers.
    def _allocate(self) -> None:
        size = max(u.nbytes for u in self.units)
        self.buffers = [self._aligned_buffer(size) for _ in range(self.plan.buffers)]
        self.holding = [None] * self.plan.buffers
        self.pending = [None] * self.plan.buffers

    def _aligned_buffer(self, size: int) -> Tensor:
        raw = torch.empty(size + _SLOT_ALIGN, dtype=torch.uint8, device=self.device)
        skip = -raw.data_ptr() % _SLOT_ALIGN
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
        # Fetches run in order (one worker thread, or one copy stream), each into a buffer that holds no
        # unit wanted now; the buffer of the unit that computed last is free again.
        for unit in wanted:
            if unit not in self.holding:
                self._fetch(unit, next(i for i, h in enumerate(self.holding) if h not in wanted))
        slot = self.holding.index(index)
        start = time.perf_counter()
        self.store.wait(self.pending[slot])
        self.wait_seconds += time.perf_counter() - start
        buffer = self.buffers[slot]
        self.units[index].bind(lambda e: _view(buffer, e.slot_offset, e.stored))

    def _after(self, index: int) -> None:
        slot = self.holding.index(index)
        self.units[index].bind(lambda e: e.stored)
        self.store.slot_free(slot)

    def stats(self) -> dict[str, float]:
        return {
            "bytes_streamed": self.bytes_streamed,
            "wait_seconds": self.wait_seconds,
        }


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
        plan = plan_offload(model, self.max_memory, self.dtype, self.buffers)
        if not plan.streamed_units:
            return model
        if self.device.type == "cuda":
            store: DiskStore | PinnedStore = PinnedStore(self.device, plan.buffers)
        elif self.device.type == "cpu":
            store = DiskStore(self.folder, self.drop_page_cache)
            _keep_large_allocations_returnable()
        else:
            raise OffloadError(f"offload supports cpu and cuda devices, not {self.device}")
        model.offload = WeightStreamer(model, plan, self.device, store)
        return model


def offload_from_args(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Offload:
    """The transform for `--max-memory` and `--offload-folder` (defined in glm.api.add_model_arguments)."""
    max_memory = getattr(args, "max_memory", None)
    if max_memory is not None:
        parse_memory(max_memory, 1)  # reject a malformed size before anything loads
    return Offload(max_memory, device, dtype, getattr(args, "offload_folder", None))
