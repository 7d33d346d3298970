"""Where the streamed tensors live between uses, and how they reach a buffer.

- `DiskStore` (CPU-only machines): one file in an offload folder, written once while loading and read back
  by background threads with `pread` (O_DIRECT where the file system allows), pages dropped after reads.
- `PinnedStore` (CUDA): pinned CPU memory, copied into the buffers on a second stream.

Both take `put` (while loading), `release`, `seal` (a unit is loaded), `fetch` (into a buffer), `wait`
(before the buffer is used), `settle` (before it is refilled) and `slot_free` (after it was used).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from glm.offload.planner import SLOT_ALIGN, OffloadError, aligned

READERS = 4  # disk reads in flight
READ_CHUNK = 8 * 2**20
_PAGE = mmap.PAGESIZE
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@dataclass
class Entry:
    """One tensor of a streamed unit: where it sits in a buffer and in the store."""

    owner: nn.Module
    name: str
    is_parameter: bool
    stored: Tensor  # the store's copy: a file-backed view (disk) or pinned memory (CUDA)
    slot_offset: int
    nbytes: int
    file_offset: int = -1
    mapping: mmap.mmap | None = None


class Unit:
    """A streamed module and its entries, laid out one after another in a buffer."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.entries: list[Entry] = []

    @property
    def nbytes(self) -> int:
        """Bytes the unit takes in a buffer."""
        return max((e.slot_offset + aligned(e.nbytes, SLOT_ALIGN) for e in self.entries), default=0)

    def bind(self, views: Callable[[Entry], Tensor]) -> None:
        """Point every tensor of the module at `views(entry)`: the store's copy or a buffer's bytes."""
        for entry in self.entries:
            value = views(entry)
            if entry.is_parameter:
                entry.owner._parameters[entry.name] = nn.Parameter(value, requires_grad=False)
            else:
                entry.owner._buffers[entry.name] = value


def slot_view(buffer: Tensor, offset: int, like: Tensor) -> Tensor:
    """The bytes of `buffer` from `offset` as a tensor of `like`'s dtype and shape."""
    return buffer[offset : offset + like.numel() * like.element_size()].view(like.dtype).view(like.shape)


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

    def put(self, entry: Entry, value: Tensor) -> None:
        """Append `value` to the file; entry.stored becomes a read-only file-backed view of it."""
        value = value.contiguous()
        offset, n = self.size, value.numel() * value.element_size()
        view = _memoryview(value, 0, n) if n else b""
        written = 0
        while written < n:
            written += os.pwrite(self.fd, view[written:], offset + written)
        self.size = aligned(offset + n, _PAGE)
        if n:
            os.ftruncate(self.fd, self.size)
            entry.mapping = mmap.mmap(self.fd, aligned(n, _PAGE), offset=offset, access=mmap.ACCESS_COPY)
            raw = torch.frombuffer(entry.mapping, dtype=torch.uint8, count=n)
            entry.stored = raw.view(value.dtype).view(value.shape)
        else:
            entry.stored = value
        entry.file_offset, entry.nbytes = offset, n

    def release(self, entry: Entry) -> None:
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

    def fetch(self, unit: Unit, slot: Tensor, slot_index: int) -> list[concurrent.futures.Future]:
        """Read a unit into a buffer in READ_CHUNK pieces, READERS at a time: several requests in flight
        keep the disk busy while a reading thread waits to be scheduled on a busy CPU."""
        direct = self._direct_fd() if slot.data_ptr() % SLOT_ALIGN == 0 else None
        fd = self.fd if direct is None else direct
        pieces = []
        for entry in unit.entries:
            # Direct reads cover whole blocks: the entry's file range and its buffer range are both padded.
            n = aligned(entry.nbytes, SLOT_ALIGN) if direct is not None else entry.nbytes
            for start in range(0, n, READ_CHUNK):
                view = _memoryview(slot, entry.slot_offset + start, min(READ_CHUNK, n - start))
                pieces.append(self.pool.submit(self._read_range, fd, view, entry.file_offset + start))
            if direct is None and self.drop_page_cache:
                pieces.append(self.pool.submit(self._drop, entry))
        return pieces

    def _drop(self, entry: Entry) -> None:
        os.posix_fadvise(self.fd, entry.file_offset, entry.nbytes, os.POSIX_FADV_DONTNEED)

    def wait(self, pending: list[concurrent.futures.Future]) -> None:
        for piece in pending:
            piece.result()

    settle = wait  # before a buffer is refilled: its previous reads must be over (several readers)

    def slot_free(self, slot_index: int) -> None:  # the compute thread waits for a unit before using it
        pass

    def seal(self, unit: Unit) -> None:  # each tensor went to the file as it arrived
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


def keep_large_allocations_returnable() -> None:
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


def pin(memory: Tensor) -> Callable[[], None]:
    """Page-lock exactly the bytes of a CPU tensor (contiguous, its own storage) and return what unlocks
    them. torch's pinned allocator (`pin_memory=True`) would round the block up to a power of two: 40 GiB of
    streamed weights would lock 64."""
    cudart = torch.cuda.cudart()
    address = memory.data_ptr()
    status = int(cudart.cudaHostRegister(address, memory.nbytes, 0))
    if status != 0:
        raise OffloadError(
            f"could not page-lock {memory.nbytes} bytes for offload (CUDA error {status}): lower "
            "--max-memory's share of streamed weights, or raise the locked-memory limit (ulimit -l)"
        )
    return lambda: cudart.cudaHostUnregister(address)


def pinned_bytes(nbytes: int) -> tuple[Tensor, Callable[[], None]]:
    """`nbytes` of page-locked CPU memory (uint8) in one allocation, and what unlocks it."""
    memory = torch.empty(nbytes, dtype=torch.uint8)
    return memory, (pin(memory) if nbytes else lambda: None)


class Arenas:
    """One allocation per unit, exactly its size in a buffer, holding its tensors laid out as in a buffer
    (each at its slot offset); a unit sealed again reuses its arena where it still fits.

    `allocate(nbytes)` gives the memory (uint8) and what frees it beyond dropping the tensor (unpinning)."""

    def __init__(self, allocate: Callable[[int], tuple[Tensor, Callable[[], None]]]) -> None:
        self.allocate = allocate
        self.by_unit: dict[str, Tensor] = {}
        self._release: dict[str, Callable[[], None]] = {}

    def seal(self, unit: Unit) -> None:
        """Copy the unit's tensors into its arena; each entry's `stored` becomes its view there."""
        arena = self.by_unit.get(unit.name)
        new = arena is None or arena.numel() < unit.nbytes
        if new:
            arena, release = self.allocate(unit.nbytes)
        for entry in unit.entries:
            view = slot_view(arena, entry.slot_offset, entry.stored)
            if view.data_ptr() != entry.stored.data_ptr():  # not there yet (new arena, or a new tensor)
                view.copy_(entry.stored)
            entry.stored = view
        if new:  # the old arena only now: the copies above may have read from it
            self.free(unit.name)
            self.by_unit[unit.name], self._release[unit.name] = arena, release

    def free(self, name: str) -> None:
        self.by_unit.pop(name, None)
        self._release.pop(name, lambda: None)()

    def free_all(self) -> None:
        for name in list(self.by_unit):
            self.free(name)


class PinnedStore:
    """Streamed tensors in pinned CPU memory, copied to the GPU on a copy stream: while loading, a unit's
    tensors stay where the loader put them; once it is loaded (`seal`) they move into its arena, one
    exact-size pinned allocation (Arenas)."""

    def __init__(
        self,
        device: torch.device,
        buffers: int,
        allocate: Callable[[int], tuple[Tensor, Callable[[], None]]] = pinned_bytes,
    ) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in range(buffers)]
        self.free = [torch.cuda.Event() for _ in range(buffers)]
        self.arenas = Arenas(allocate)
        # unpinned before the arenas go (the finalizer holds them): a view outliving the store stays valid
        weakref.finalize(self, self.arenas.free_all)

    def put(self, entry: Entry, value: Tensor) -> None:
        entry.stored, entry.nbytes = value, value.numel() * value.element_size()

    def release(self, entry: Entry) -> None:
        pass

    def seal(self, unit: Unit) -> None:
        self.arenas.seal(unit)

    def fetch(self, unit: Unit, slot: Tensor, slot_index: int) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[slot_index])
            for entry in unit.entries:
                slot_view(slot, entry.slot_offset, entry.stored).copy_(entry.stored, non_blocking=True)
            self.ready[slot_index].record(self.stream)
        return self.ready[slot_index]

    def wait(self, pending: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(pending)

    def slot_free(self, slot_index: int) -> None:
        self.free[slot_index].record(torch.cuda.current_stream(self.device))

    def settle(self, pending: torch.cuda.Event) -> None:  # copies into a buffer run in stream order
        pass
