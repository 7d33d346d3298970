"""Decode speed while streaming weights from disk under a memory budget, against the disk's bandwidth.

    python -m bench.offload --model glm-600m --max-memory 25%
    python -m bench.offload --model glm-130b --layers 14 --bits 4 --dtype bfloat16 --max-memory 6GiB \\
        --prompt-length 4 --decode-tokens 3

1. The disk: sequential read bandwidth of a fresh file in the offload folder (written, synced, dropped from
   the page cache, then read in 64 MiB preads), measured in the same run.
2. The model (random weights, optionally quantized by the quantization transform) is built on the meta
   device and transformed with `glm.offload.Offload`; its weights are then handed to the modules exactly as
   the loader hands them over (`load_weight`, then `finish_loading`), so the streamed matrices are written
   once to the offload folder. No checkpoint is written: the streamed copy on disk is the one read back.
3. Batch-1 greedy decode: a prefill, then single-token steps; per step the streamed bytes (read from disk:
   the page cache is dropped after each read) and the time. Peak RSS above the start is recorded beside
   the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.benchmark import cpu_snapshot, other_cores
from bench.machine import cpu_description
from glm.config import get_preset
from glm.loading import finish_loading, hand_over, resolve_dtype
from glm.model import GLM
from glm.offload import Offload, format_bytes

GB = 1e9


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def disk_read_bandwidth(folder: Path, size: int) -> float:
    """GB/s of sequential 64 MiB reads of a fresh file, with O_DIRECT as the streamer reads (buffered and
    dropped from the page cache where O_DIRECT is unsupported)."""
    path = folder / "disk-bandwidth.bin"
    block = mmap.mmap(-1, 64 * 2**20)  # page-aligned, as direct I/O needs
    block.write(os.urandom(len(block)))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block, offset)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            reader = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            reader = os.open(path, os.O_RDONLY)
        start, done = time.perf_counter(), 0
        while done < size:
            done += os.preadv(reader, [block], done)
        seconds = time.perf_counter() - start
        os.close(reader)
    finally:
        os.close(fd)
        path.unlink()
    return size / seconds / GB


def random_fill(tensor: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Fill with a tiled random block (memcpy speed: the bench measures streaming, not the values)."""
    flat = tensor.view(-1)
    raw = block.view(tensor.dtype)
    for start in range(0, flat.numel(), raw.numel()):
        n = min(raw.numel(), flat.numel() - start)
        flat[start : start + n] = raw[:n]
    return tensor


def fill_weights(model: GLM, dtype: torch.dtype, seed: int) -> None:
    """Random weights through the loader's hand-over (load_weight or assign, then finish_loading)."""
    generator = torch.Generator().manual_seed(seed)
    floats = (torch.randn(2**22, generator=generator) * 0.02).to(dtype)
    ints = torch.randint(-128, 128, (2**23,), dtype=torch.int8, generator=generator)
    cpu = torch.device("cpu")
    for key, meta in [*model.named_parameters(), *model.named_buffers()]:
        name = key.rpartition(".")[2]
        tensor = torch.empty(meta.shape, dtype=dtype if meta.is_floating_point() else meta.dtype)
        if "layernorm" in key:
            tensor.fill_(1.0 if name == "weight" else 0.0)
        elif name == "weight_scale":
            tensor.fill_(0.002)
        else:
            random_fill(tensor, (floats if tensor.is_floating_point() else ints).view(torch.uint8))
        hand_over(model, key, tensor, dtype, cpu)
        del tensor
    finish_loading(model)


def decode(model: GLM, prompt_length: int, steps: int) -> list[tuple[float, int]]:
    """(seconds, streamed bytes) of the prefill and of each greedy decode step, batch 1."""
    streamer = model.offload
    total = prompt_length + steps
    cache = model.new_cache(1, total)
    ids = torch.arange(prompt_length)[None] % model.config.vocab_size
    mask = torch.zeros(1, 1, total, total, dtype=torch.bool)
    positions = torch.arange(total)[None]
    timings = []
    with torch.no_grad():
        for step in range(steps + 1):
            start, before = time.perf_counter(), streamer.bytes_streamed
            s, t = (prompt_length, 0) if step == 0 else (1, prompt_length + step - 1)
            at = torch.tensor([[s - 1]])
            logits = model(ids, positions[:, t : t + s], mask[:, :, t : t + s, : t + s], cache, at)
            ids = logits[:, -1:].argmax(-1)
            timings.append((time.perf_counter() - start, streamer.bytes_streamed - before))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.offload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glm-600m", help="a model-shape preset")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (disk space)")
    parser.add_argument("--bits", type=int, choices=[4, 8], help="quantize with the quantization transform")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-memory", default="25%", help="offload budget: bytes or a share of the weights")
    parser.add_argument("--buffers", type=int, default=2, help="streaming buffers (fetch depth + 1)")
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=6)
    parser.add_argument("--folder", default="bench-offload", help="offload folder (on the disk measured)")
    parser.add_argument("--disk-test-bytes", type=float, default=1e9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", help="JSON results file (default: bench/results/offload-<model>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = get_preset(args.model)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))

    disk = disk_read_bandwidth(folder, int(args.disk_test_bytes))
    print(f"disk sequential read: {disk:.2f} GB/s")
    with torch.device("meta"):
        model = GLM(config)
    # The baseline is taken after the first meta build: importing torch's meta kernels costs ~70 MB once.
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    base = rss()
    if args.bits:
        from glm.quantize import quantization_transform

        model = quantization_transform(args.bits)(model)
    model = Offload(args.max_memory, "cpu", dtype, folder, buffers=args.buffers)(model)
    model.compute_device = torch.device("cpu")
    plan = model.offload.plan
    print(
        f"weights {format_bytes(plan.total_bytes)}, budget {format_bytes(plan.max_memory)}: "
        f"{len(plan.streamed_units)} of {4 * config.num_layers} matrices stream "
        f"({format_bytes(plan.streamed_bytes)} per token)"
    )
    start = time.perf_counter()
    fill_weights(model, dtype, seed=0)
    store = model.offload.store
    os.fsync(store.fd)  # written once; then out of the page cache so that decoding reads the disk
    os.posix_fadvise(store.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    write_seconds = time.perf_counter() - start
    print(f"built and wrote {format_bytes(store.size)} in {write_seconds:.1f} s")
    model.eval()

    Path("/proc/self/clear_refs").write_text("5")  # the decode's own peak
    before = cpu_snapshot()
    timings = decode(model, args.prompt_length, args.decode_tokens)
    busy = other_cores(before, cpu_snapshot())
    decode_peak = rss("VmHWM") - base
    # The disk is shared with other processes: its bandwidth is measured before and after the decode.
    disk_after = disk_read_bandwidth(folder, int(args.disk_test_bytes))
    disk_mean = (disk + disk_after) / 2
    steps = timings[2:] if len(timings) > 3 else timings[1:]  # the first decode step may finish a prefetch
    seconds = sum(t for t, _ in steps)
    streamed = sum(b for _, b in steps)
    results: dict[str, Any] = {
        "command": "python -m bench.offload " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model,
        "layers": config.num_layers,
        "bits": args.bits,
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": plan.total_bytes,
        "budget_bytes": plan.max_memory,
        "device_bytes": plan.device_bytes,
        "streamed_matrices": len(plan.streamed_units),
        "buffers": plan.buffers,
        "streamed_bytes_per_token": plan.streamed_bytes,
        "offload_file_bytes": store.size,
        "build_and_write_seconds": round(write_seconds, 2),
        "disk_read_gb_per_s_before_and_after": [round(disk, 3), round(disk_after, 3)],
        "prefill_seconds": round(timings[0][0], 3),
        "decode_step_seconds": [round(t, 3) for t, _ in timings[1:]],
        "decode_tokens_per_s": round(len(steps) / seconds, 4),
        "seconds_per_token": round(seconds / len(steps), 3),
        "streaming_gb_per_s": round(streamed / seconds / GB, 3),
        "fraction_of_disk": round(streamed / seconds / GB / disk_mean, 3),
        "disk_bound_seconds_per_token": round(plan.streamed_bytes / GB / disk_mean, 3),
        "compute_thread_wait_seconds": round(model.offload.wait_seconds, 2),
        "decode_peak_rss_above_start_bytes": decode_peak,
        "rss_at_start_bytes": base,
        "rss_anon_and_file_at_end_bytes": [rss("RssAnon"), rss("RssFile")],
        "other_processes_busy_cores": round(busy, 2),
    }
    print(json.dumps(results, indent=1))
    output = Path(args.output or f"bench/results/offload-{args.model}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
