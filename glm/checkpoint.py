"""The original checkpoint layout: reading, writing and loading a model from it.

    <folder>/latest                              the iteration tag, e.g. "49300" or "release"
    <folder>/<tag>/mp_rank_XX_model_states.pt    torch.save({"module": state_dict}) per tensor-parallel rank
    <folder>/model_config.json                   written by this project: model shape, tokenizer, TP size
    <folder>/<tokenizer file>                    written by this project

Files are read with `weights_only=True`; the only non-tensor objects allowed are those SAT itself stores
beside the weights (an argparse Namespace and NumPy RNG state).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import importlib.util
import json
import mmap
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glm.config import GLMConfig
from glm.files import publish_folder
from glm.sharding import Split, full_shape, slice_views, split_dim, split_rule, split_state_dict
from glm.tokenizer import GLMTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "model_config.json"
_SHARD = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_MADV_DONTNEED = 4
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux/glibc: pages are simply not dropped early
    _LIBC = None


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and the fix."""


def _safe_globals() -> list[Any]:
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    core = getattr(np, "_core", None) or np.core
    allowed += [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return allowed


def read_tag(folder: Path) -> str:
    latest = folder / "latest"
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not latest.is_file():
        raise CheckpointError(
            f"{latest} is missing: a checkpoint folder holds a 'latest' file naming its iteration folder"
        )
    tag = latest.read_text().strip()  # the original did not strip, so a trailing newline broke its paths
    if not tag or not (folder / tag).is_dir():
        raise CheckpointError(f"{latest} names iteration '{tag}' but {folder / tag} is not a folder")
    return tag


def shard_paths(folder: Path, metadata: dict[str, Any] | None = None) -> list[Path]:
    """The rank files of a checkpoint, in rank order; checks none is missing. `metadata`: the folder's
    model_config.json when the caller has read it already."""
    iteration = folder / read_tag(folder)
    ranks = {}
    for path in iteration.iterdir():
        match = _SHARD.fullmatch(path.name)
        if match:
            ranks[int(match.group(1))] = path
    if not ranks:
        raise CheckpointError(f"{iteration} holds no mp_rank_XX_model_states.pt files")
    # The last rank's absence is only visible from the TP size recorded in model_config.json, if any.
    meta = (metadata if metadata is not None else read_metadata(folder)) or {}
    size = max(max(ranks) + 1, meta.get("tensor_parallel_size") or 0)
    missing = [r for r in range(size) if r not in ranks]
    if missing:
        raise CheckpointError(
            f"{iteration} lacks the shard for rank(s) {missing}: found {len(ranks)} of {size} files"
        )
    return [ranks[r] for r in range(len(ranks))]


def load_shard(path: Path) -> dict[str, Tensor]:
    """The state dict of one rank file (memory-mapped where the format allows)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises several types for damaged or hostile files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "numpy" in str(e) and importlib.util.find_spec("numpy") is None:  # SAT's pickled RNG states
            raise CheckpointError(
                f"checkpoint shard {path} holds NumPy objects (SAT's saved RNG states): pip install numpy"
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint shard {path}: {first_line} "
            "(the file is truncated, corrupt or holds objects other than weights; "
            "re-download or re-convert it)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("module"), dict):
        raise CheckpointError(f"{path} has no 'module' state dict: not a checkpoint in the original layout")
    return data["module"]


def read_metadata(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {meta['format_version']}; upgrade this project")
    return meta


def _drop_pages(tensor: Tensor) -> None:
    """Return a memory-mapped tensor's pages to the page cache, so they stop counting in this process's
    memory (the file stays readable: a later access faults them back in). A no-op where unsupported."""
    if _LIBC is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    aligned = (start + page - 1) // page * page  # whole pages inside the tensor only
    if end - aligned >= page:
        _LIBC.madvise(
            ctypes.c_void_p(aligned), ctypes.c_size_t((end - aligned) // page * page), _MADV_DONTNEED
        )


class ShardedCheckpoint:
    """The rank files of a checkpoint, memory-mapped, read one tensor slice at a time.

    `read(key, rank, world_size)` gives part `rank` of `world_size` of a key whatever size the checkpoint
    was saved with (glm/sharding.py's rules): a view of one source file where it can be, a concatenation
    of only the needed source slices otherwise. `bytes_read` counts the source bytes those slices span.
    """

    def __init__(self, folder: str | Path, metadata: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.paths = shard_paths(self.folder, metadata)
        self.shards = [load_shard(p) for p in self.paths]
        # Zip-format files are memory-mapped by load_shard; legacy ones are read into (anonymous) memory,
        # whose pages must never be dropped.
        self.mapped = all(zipfile.is_zipfile(p) for p in self.paths)
        self.bytes_read = 0
        for path, shard in zip(self.paths, self.shards, strict=True):
            for key in shard:
                try:
                    split_rule(key)
                except KeyError:
                    hint = " (a quantized checkpoint?)" if key.endswith("_scale") else ""
                    raise CheckpointError(f"{path}: unexpected key '{key}'{hint}") from None
            if set(shard) != set(self.shards[0]):
                diff = sorted(set(shard) ^ set(self.shards[0]))
                raise CheckpointError(f"{path} holds other keys than {self.paths[0]}: {', '.join(diff[:3])}")
        self.keys = [k for k in self.shards[0] if split_rule(k) is not Split.IGNORED]

    @property
    def tensor_parallel_size(self) -> int:
        return len(self.shards)

    def shape(self, key: str) -> torch.Size:
        """The unsharded shape of `key`, from the files' headers."""
        try:
            return full_shape(key, [s[key].shape for s in self.shards])
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[0][key].dtype

    def read(self, key: str, rank: int = 0, world_size: int = 1) -> Tensor:
        try:
            views = slice_views(key, [s[key] for s in self.shards], rank, world_size)
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        self.bytes_read += sum(v.numel() * v.element_size() for v in views)
        return views[0] if len(views) == 1 else torch.cat(views, dim=split_dim(split_rule(key)))

    def release(self, key: str, kept: Tensor | None = None) -> None:
        """Drop the pages of `key` this process touched, once its slice has been copied elsewhere; a source
        whose storage `kept` still uses (a tensor loaded without a copy) keeps its pages."""
        if not self.mapped:
            return
        in_use = kept.untyped_storage().data_ptr() if isinstance(kept, Tensor) and kept.numel() else None
        for shard in self.shards:
            if shard[key].untyped_storage().data_ptr() != in_use:
                _drop_pages(shard[key])


class CheckpointFolder:
    """A checkpoint folder opened once for one load and shared by every step of it (the quantization
    probe, the loader): model_config.json is read at most once and the rank files are memory-mapped at most
    once, each on first use, so errors come in the order the steps meet them. Prints as the path it was
    given."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._given = str(folder)

    def __str__(self) -> str:
        return self._given

    @functools.cached_property
    def metadata(self) -> dict[str, Any] | None:
        """model_config.json, or None where the folder has none (the original's checkpoints)."""
        return read_metadata(self.folder)

    @functools.cached_property
    def shards(self) -> ShardedCheckpoint:
        return ShardedCheckpoint(self.folder, self.metadata)


def open_checkpoint(checkpoint: str | Path | CheckpointFolder) -> CheckpointFolder:
    """`checkpoint` itself when it is already open, else the folder opened."""
    return checkpoint if isinstance(checkpoint, CheckpointFolder) else CheckpointFolder(checkpoint)


def load_state_dict(folder: str | Path) -> tuple[dict[str, Tensor], int]:
    """The full (unsharded) state dict of a checkpoint and the tensor-parallel size it was saved with."""
    checkpoint = ShardedCheckpoint(folder)
    return {k: checkpoint.read(k) for k in checkpoint.keys}, checkpoint.tensor_parallel_size


def check_state_dict(state_dict: dict[str, Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Every expected key present with its expected shape, and nothing else."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing keys {', '.join(missing[:3])}{more}")
    for key, tensor in state_dict.items():
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key '{key}'")
        if tensor.shape != expected[key]:
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(tensor.shape)} but the model config needs "
                f"{tuple(expected[key])} (wrong config, or a shard of another tensor-parallel size?)"
            )


def check_tensor_parallel_size(config: GLMConfig, size: int) -> None:
    if size < 1 or config.num_attention_heads % size or config.vocab_size % size:
        raise CheckpointError(
            f"tensor-parallel size {size} must divide the {config.num_attention_heads} attention heads "
            f"and the {config.vocab_size} vocabulary rows"
        )


def write_checkpoint(
    folder: str | Path,
    rank_state_dict: Callable[[int], dict[str, Tensor]],
    config: GLMConfig,
    tensor_parallel_size: int = 1,
    tokenizer: GLMTokenizer | dict | None = None,
    tag: str = "release",
    overwrite: bool = False,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint in the original layout plus model_config.json and the tokenizer file.

    rank_state_dict(r) gives rank r's state dict (called once per rank, so shards can be made one at a
    time). `tokenizer` may also be a stored icetk tokenizer config (icetk's model file is the user's own
    copy, never shipped). Written into a temporary folder beside `folder` (holding the writer's pid, so a
    rerun after a kill can remove it) and renamed at the end, so a failure leaves nothing behind.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another output folder or remove it")
    check_tensor_parallel_size(config, tensor_parallel_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with publish_folder(folder) as tmp:
        (tmp / tag).mkdir()
        dtype = None
        for rank in range(tensor_parallel_size):
            shard = rank_state_dict(rank)
            dtype = dtype or next(iter(shard.values())).dtype
            torch.save({"module": shard}, tmp / tag / f"mp_rank_{rank:02d}_model_states.pt")
            del shard
        (tmp / "latest").write_text(tag)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": config.to_dict(),
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": str(dtype).removeprefix("torch."),
            "quantization_bit_width": None,
            **(extra_metadata or {}),
        }
        if isinstance(tokenizer, GLMTokenizer):
            meta["tokenizer"] = tokenizer.to_config()
            if tokenizer.kind != "icetk":
                shutil.copyfile(tokenizer.model_file, tmp / meta["tokenizer"]["file"])
        elif tokenizer is not None:
            meta["tokenizer"] = tokenizer
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def save_checkpoint(
    state_dict: dict[str, Tensor],
    folder: str | Path,
    config: GLMConfig,
    tokenizer: GLMTokenizer | None = None,
    tensor_parallel_size: int = 1,
    tag: str = "release",
    overwrite: bool = False,
) -> Path:
    """Write a full state dict split into tensor_parallel_size shards (see write_checkpoint)."""
    check_tensor_parallel_size(config, tensor_parallel_size)
    shards = split_state_dict(state_dict, tensor_parallel_size) if tensor_parallel_size > 1 else [state_dict]
    return write_checkpoint(
        folder, shards.__getitem__, config, tensor_parallel_size, tokenizer, tag, overwrite
    )
