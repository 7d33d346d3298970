"""Weight offload under a memory budget: a transform of the meta model, a no-op when off.

`Offload(max_memory, device, dtype)` is the last load transform (after tensor parallelism and
quantization), so it sees each rank's own, possibly quantized, modules and budgets per rank. It keeps
resident on the compute device the embedding (tied to the output layer), the LayerNorms and as many of the
blocks' weight matrices (`query_key_value`, `attention.dense`, `dense_h_to_4h`, `dense_4h_to_h`, each with
everything it holds: weight, bias, quantization scales, packed bytes) as fit, layer by layer from the first,
and streams the rest, one matrix at a time, through buffers the size of the largest one (two by default):
while one matrix computes, the next ones are copied into the other buffers.

- On CUDA the streamed matrices live in pinned CPU memory (one exact-size page-locked block per matrix, laid
  out as in a buffer) and are copied on a second stream.
- On a CPU-only machine they are written once, while loading, to a file in an offload folder (the compute
  dtype, or the packed quantized bytes) and read back by background threads with `pread`; the pages are
  dropped from the page cache after each read, so neither the process nor the page cache holds more than
  the budget (each token reads the streamed weights from disk).

The budget (`--max-memory`) counts weights only: the resident ones plus the buffers. The KV cache and
activations come on top (`python -m glm.plan` adds them up). Outputs are bit-identical to a run without
offload: the same bytes reach the same kernels.

Files: planner.py (`plan_offload`, `OffloadPlan`), stores.py (`DiskStore`, `PinnedStore`), streamer.py
(`WeightStreamer`), transform.py (`Offload`, `offload_from_args`); the flags' sizes are glm/sizes.py (no
torch). The names below are imported on first use (PEP 562), so the torch-free ones do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glm.lazy import lazy_exports
from glm.sizes import format_bytes, parse_memory

if TYPE_CHECKING:
    from glm.offload.planner import OffloadError, OffloadPlan, laid_out_for, plan_offload, tensor_bytes
    from glm.offload.stores import DiskStore, PinnedStore
    from glm.offload.streamer import WeightStreamer
    from glm.offload.transform import Offload, offload_from_args

_EXPORTS = {
    "OffloadError": "glm.offload.planner",
    "OffloadPlan": "glm.offload.planner",
    "laid_out_for": "glm.offload.planner",
    "plan_offload": "glm.offload.planner",
    "tensor_bytes": "glm.offload.planner",
    "DiskStore": "glm.offload.stores",
    "PinnedStore": "glm.offload.stores",
    "WeightStreamer": "glm.offload.streamer",
    "Offload": "glm.offload.transform",
    "offload_from_args": "glm.offload.transform",
}

__all__ = [
    "DiskStore",
    "Offload",
    "OffloadError",
    "OffloadPlan",
    "PinnedStore",
    "WeightStreamer",
    "format_bytes",
    "laid_out_for",
    "offload_from_args",
    "parse_memory",
    "plan_offload",
    "tensor_bytes",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
