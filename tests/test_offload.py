"""Weight offload: outputs identical to the resident model, memory under the budget, quantized modules."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tolerance import assert_model_close
from torch import Tensor, nn

from glm import cpu_decode
from glm.checkpoint import save_checkpoint
from glm.config import GLMConfig
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.loading import load_model
from glm.model import GLM, Linear, init_random_weights
from glm.offload import Offload, OffloadError, parse_memory, plan_offload
from glm.offload.planner import SLOT_ALIGN, aligned
from glm.offload.stores import PinnedStore, pinned_bytes
from glm.offload.streamer import WeightStreamer

REPO = Path(__file__).resolve().parent.parent
CONFIG = GLMConfig(
    num_layers=3,
    hidden_size=64,
    num_attention_heads=4,
    inner_hidden_size=96,
    vocab_size=128,
    max_sequence_length=64,
)


@pytest.fixture(autouse=True)
def modules_path(monkeypatch):
    """Offload is bit-identical to the resident model on the modules' path. A streamed block always takes
    it (its linears carry the streaming hooks, which the fused decode block would skip), so the resident
    model must too; `test_the_fused_decode_block_runs_beside_streamed_blocks` compares the default."""
    monkeypatch.setattr(cpu_decode, "ENABLED", False)
    monkeypatch.setenv("GLM_FUSED_DECODE", "0")  # the CLI's subprocesses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = init_random_weights(GLM(CONFIG), seed=3, std=0.2)
    folder = tmp_path_factory.mktemp("offload") / "ckpt"
    return save_checkpoint({k: v.half() for k, v in model.state_dict().items()}, folder, CONFIG)


def streamed(model: GLM) -> int:
    return len(model.offload.plan.streamed_units) if hasattr(model, "offload") else 0


def forward_passes(model: GLM, ids: Tensor) -> list[Tensor]:
    """A prefill and three cached decode steps."""
    b, s = ids.shape
    cache = model.new_cache(b, s + 3)
    outputs = [model(ids, torch.arange(s).expand(b, s), torch.zeros(1, 1, s, s, dtype=torch.bool), cache)]
    for i in range(3):
        mask = torch.zeros(1, 1, 1, s + i + 1, dtype=torch.bool)
        outputs.append(model(ids[:, i : i + 1], torch.full((b, 1), s + i), mask, cache))
    return outputs


@pytest.mark.parametrize("budget,buffers", [("32%", 2), ("50%", 2), ("80%", 2), ("50%", 3), ("70%", 5)])
def test_logits_are_bit_identical_in_fp32(checkpoint, budget, buffers):
    reference, _ = load_model(checkpoint, dtype="float32")
    offload = Offload(budget, "cpu", torch.float32, buffers=buffers)
    offloaded, _ = load_model(checkpoint, dtype="float32", transforms=[offload])
    assert offloaded.offload.plan.buffers == buffers
    assert streamed(offloaded) > 0
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second pass starts from the wrapped-around prefetch
        for a, b in zip(forward_passes(reference, ids), forward_passes(offloaded, ids), strict=True):
            assert torch.equal(a, b)
    # Between forwards the streamed modules hold the stored weights: the state dicts agree.
    for (key, a), (_, b) in zip(reference.state_dict().items(), offloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_greedy_and_beam_tokens_are_identical(checkpoint):
    reference, _ = load_model(checkpoint, dtype="float32")
    offloaded, _ = load_model(checkpoint, dtype="float32", transforms=[Offload("40%", "cpu", torch.float32)])
    assert streamed(offloaded) >= 8
    contexts = [[5, 17, 3, 99, 1], [7, 7, 42]]
    for make in (
        lambda: BaseStrategy(2, top_k=1),
        lambda: BeamSearchStrategy(2, num_beams=3, deterministic=True, no_repeat_ngram_size=2),
    ):
        want = generate(reference, contexts, make(), max_gen_length=12)
        got = generate(offloaded, contexts, make(), max_gen_length=12)
        assert got == want


def test_the_fused_decode_block_runs_beside_streamed_blocks(checkpoint, monkeypatch):
    monkeypatch.setattr(cpu_decode, "ENABLED", True)
    fused = []
    monkeypatch.setattr(cpu_decode, "block_forward", spy(cpu_decode.block_forward, fused))
    reference, _ = load_model(checkpoint, dtype="float32")
    offloaded, _ = load_model(checkpoint, dtype="float32", transforms=[Offload("70%", "cpu", torch.float32)])
    streamed_layers = {name.split(".")[2] for name in offloaded.offload.plan.streamed_units}
    resident_layers = CONFIG.num_layers - len(streamed_layers)
    assert 0 < resident_layers < CONFIG.num_layers
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    want = forward_passes(reference, ids)
    calls = len(fused)
    got = forward_passes(offloaded, ids)
    assert calls == 3 * CONFIG.num_layers and len(fused) - calls == 3 * resident_layers  # decode steps only
    for a, b in zip(got, want, strict=True):
        assert_model_close(a, b, CONFIG)  # streamed blocks ran the modules: equal up to summation order


def spy(function: Callable, calls: list) -> Callable:
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def test_everything_fits_is_a_no_op(checkpoint):
    model, _ = load_model(checkpoint, transforms=[Offload("1GiB", "cpu", torch.float32), Offload(None)])
    assert not hasattr(model, "offload")


def test_plan_keeps_a_prefix_and_counts_bytes():
    with torch.device("meta"):
        model = GLM(CONFIG)
    h, inner, v = CONFIG.hidden_size, CONFIG.inner_hidden_size, CONFIG.vocab_size

    def matrix(rows, columns, page=4096):  # fp32 weight and bias, each padded to a page in a buffer
        return (
            rows * columns * 4,
            rows * 4,
            -(-rows * columns * 4 // page) * page + -(-rows * 4 // page) * page,
        )

    qkv, dense, up, down = matrix(3 * h, h), matrix(h, h), matrix(2 * inner, h), matrix(h, inner)
    fixed = (v * h + CONFIG.num_layers * 4 * h + 2 * h) * 4  # embedding and LayerNorms, fp32
    budget = fixed + 2 * up[2] + qkv[2] + dense[2]  # room for two buffers and the first two matrices
    plan = plan_offload(model, budget, torch.float32)
    assert plan.fixed_bytes == fixed
    assert plan.resident_units == (
        "transformer.layers.0.attention.query_key_value",
        "transformer.layers.0.attention.dense",
    )
    assert plan.buffer_bytes == 2 * up[2]
    per_layer = sum(m[0] + m[1] for m in (qkv, dense, up, down))
    assert plan.streamed_bytes == sum(up[:2]) + sum(down[:2]) + (CONFIG.num_layers - 1) * per_layer
    assert plan.total_bytes == CONFIG.num_parameters() * 4
    with pytest.raises(OffloadError, match="minimum"):
        plan_offload(model, fixed + 2 * up[2] - 1, torch.float32)


def test_parse_memory():
    assert parse_memory("22GiB") == 22 * 1024**3
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory("512MiB") == 512 * 1024**2
    assert parse_memory("25%", 1000) == 250
    assert parse_memory(123) == 123
    with pytest.raises(ValueError, match="22GiB"):
        parse_memory("lots")


class Int8Linear(nn.Module):
    """A stand-in quantized layer: int8 weights and an fp16 scale per row, quantized in load_weight."""

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16))
        self.bias = linear.bias

    def load_weight(self, name, tensor, dtype, device):
        if name != "weight":
            self.bias = nn.Parameter(tensor.to(device, dtype), requires_grad=False)
            return
        scale = (tensor.float().abs().amax(dim=1) / 127).half()
        self.weight = (tensor.float() / scale.float()[:, None]).round().to(torch.int8).to(device)
        self.weight_scale = scale.to(device)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.weight_scale.float()[:, None], self.bias)


def quantize(model: GLM) -> GLM:
    for layer in model.transformer.layers:
        layer.attention.query_key_value = Int8Linear(layer.attention.query_key_value)
        layer.mlp.dense_h_to_4h = Int8Linear(layer.mlp.dense_h_to_4h)
    return model


def test_streams_whatever_a_quantized_module_holds(checkpoint):
    reference, _ = load_model(checkpoint, dtype="float32", transforms=[quantize])
    offloaded, _ = load_model(
        checkpoint, dtype="float32", transforms=[quantize, Offload("50%", "cpu", torch.float32)]
    )
    units = offloaded.offload.units
    assert any(e.stored.dtype == torch.int8 for u in units for e in u.entries)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    for a, b in zip(forward_passes(reference, ids), forward_passes(offloaded, ids), strict=True):
        assert torch.equal(a, b)


def test_cli_with_max_memory_gives_the_same_answers(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("Tsinghua University is located in [MASK].\nThe capital of France is [MASK].\n")
    outputs = []
    for extra in ([], ["--max-memory", "50%"]):
        out = tmp_path / f"out{len(extra)}"
        subprocess.run(
            [
                *[sys.executable, "-m", "glm.generate", "--input-source", str(queries)],
                *["--output-path", str(out), "--sampling-strategy", "BeamSearchStrategy", "--deterministic"],
                *["--out-seq-length", "24", *extra],
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        outputs.append({p.name.split("-")[0]: p.read_text() for p in out.iterdir()})
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


def test_cli_budget_too_small_is_one_line_error(tmp_path):
    (tmp_path / "query.txt").write_text("A [MASK].\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm.generate",
            "--input-source",
            str(tmp_path / "query.txt"),
            "--max-memory",
            "1MiB",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: --max-memory 1.00 MiB is below the minimum")


# Run in a fresh process: peak resident memory, once the interpreter, torch and the one-off allocations of a
# first forward are warm, of loading and running a model (prefill of `length - 1` tokens, a decode step).
PROBE = r"""
import json, sys, torch
from dataclasses import replace
from glm.config import GLMConfig
from glm.loading import load_model
from glm.model import GLM, init_random_weights
from glm.offload import Offload
folder, budget, batch, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def run(model, batch, length):
    cache = model.new_cache(batch, length)
    ids = torch.zeros(batch, length - 1, dtype=torch.long)
    positions = torch.arange(length - 1).expand(batch, -1)
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    with torch.no_grad():
        last = torch.zeros(batch, 1, dtype=torch.long)
        model(ids, positions, mask[:, :, : length - 1, : length - 1], cache, last)
        model(ids[:, :1], positions[:, :1], mask[:, :, length - 1 :, :], cache)
warm = init_random_weights(GLM(GLMConfig(1, 64, 4, 64, 64, 32)))
run(warm, 1, 16)
with torch.device("meta"):
    GLM(warm.config)
del warm
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
transforms = [] if budget == "none" else [Offload(budget, "cpu", torch.float32)]
model, _ = load_model(folder, dtype="float32", transforms=transforms)
loaded = status("VmHWM") - base
run(model, batch, length)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
device = model.offload.plan.device_bytes if hasattr(model, "offload") else weights
print(json.dumps(dict(load_peak=loaded, run_peak=status("VmHWM") - base, weights=weights, device=device)))
"""

MEMORY_CONFIG = GLMConfig(
    num_layers=6,
    hidden_size=768,
    num_attention_heads=8,
    inner_hidden_size=2048,
    vocab_size=4096,
    max_sequence_length=256,
)


def build_memory_checkpoint(folder: Path) -> Path:
    """A 183 MB (fp32) model, stored in fp16: large enough that RSS differences are weights."""
    with torch.device("meta"):
        model = GLM(MEMORY_CONFIG)
    model = init_random_weights(model.to_empty(device="cpu"), seed=0)
    return save_checkpoint({k: v.half() for k, v in model.state_dict().items()}, folder, MEMORY_CONFIG)


@pytest.fixture(scope="module")
def memory_checkpoint(tmp_path_factory) -> Path:
    return build_memory_checkpoint(tmp_path_factory.mktemp("memory") / "ckpt")


def probe(folder: Path, budget: str, batch: int = 1, length: int = 32, env: dict | None = None) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), budget, str(batch), str(length)],
        # every matrix in the model dtype (no 16-bit storage for the native matmul), as the planner counts
        env={**os.environ, "GLM_NATIVE": "0", **(env or {})},
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS")
def test_resident_memory_stays_under_the_budget(memory_checkpoint):
    full = probe(memory_checkpoint, "none")
    offloaded = probe(memory_checkpoint, "25%")
    mib = 2**20
    # The measurement sees the weights: the resident model's peak is at least its weights...
    assert full["run_peak"] >= full["weights"]
    overhead = full["run_peak"] - full["weights"]  # allocator and first-forward slack of this process
    budget = offloaded["weights"] // 4
    assert offloaded["device"] <= budget
    # ...and the offloaded one stays under its budget loading, and under it plus the same slack running.
    assert offloaded["load_peak"] <= budget
    assert offloaded["run_peak"] <= budget + overhead + 4 * mib
    assert offloaded["run_peak"] < full["run_peak"] / 2


@pytest.mark.parametrize("bits", [8, 4])
def test_streams_the_quantization_transforms_packed_layers(checkpoint, bits):
    from glm.quantize import quantization_transform

    quantize_real = quantization_transform(bits)
    reference, _ = load_model(checkpoint, dtype="float32", transforms=[quantization_transform(bits)])
    offloaded, _ = load_model(
        checkpoint, dtype="float32", transforms=[quantize_real, Offload("80%", "cpu", torch.float32)]
    )
    dtypes = {e.name: e.stored.dtype for u in offloaded.offload.units for e in u.entries}
    assert dtypes["weight"] == torch.int8 and dtypes["weight_scale"] == torch.float16
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    for a, b in zip(forward_passes(reference, ids), forward_passes(offloaded, ids), strict=True):
        assert torch.equal(a, b)


def test_reads_split_into_many_concurrent_chunks(checkpoint, monkeypatch):
    monkeypatch.setattr("glm.offload.stores.READ_CHUNK", 4096)  # every matrix read in several pieces at once
    reference, _ = load_model(checkpoint, dtype="float32")
    offloaded, _ = load_model(checkpoint, dtype="float32", transforms=[Offload("40%", "cpu", torch.float32)])
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    for _ in range(3):
        for a, b in zip(forward_passes(reference, ids), forward_passes(offloaded, ids), strict=True):
            assert torch.equal(a, b)


def test_the_next_matrix_is_fetched_before_the_current_one_is_waited_for(checkpoint):
    # The prefetch order from the streamer's own calls to its store, not from timing: with two buffers,
    # each unit's wait comes after the fetch of the unit after it (wrapping around to the first).
    offloaded, _ = load_model(checkpoint, dtype="float32", transforms=[Offload("40%", "cpu", torch.float32)])
    streamer, store = offloaded.offload, offloaded.offload.store
    events: list[tuple[str, int]] = []
    fetch, wait = store.fetch, store.wait

    def logged_fetch(unit, slot, slot_index):
        events.append(("fetch", streamer.units.index(unit)))
        return fetch(unit, slot, slot_index)

    def logged_wait(pending):
        slot = next(i for i, p in enumerate(streamer.pending) if p is pending)
        events.append(("wait", streamer.holding[slot]))
        wait(pending)

    store.fetch, store.wait = logged_fetch, logged_wait
    forward_passes(offloaded, torch.tensor([[3, 1, 4, 1, 5]]))  # four forwards
    n = len(streamer.units)
    step = [e for i in range(n) for e in (("fetch", (i + 1) % n), ("wait", i))]
    assert n >= 2 and events == [("fetch", 0), *(step * 4)]


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or "tmpfs" not in Path("/proc/mounts").read_text(), reason="needs tmpfs"
)
def test_an_offload_folder_in_memory_is_refused(checkpoint):
    with pytest.raises(OffloadError, match="lives in memory: give --offload-folder a folder on a disk"):
        load_model(checkpoint, transforms=[Offload("40%", "cpu", torch.float32, folder="/dev/shm/glm-test")])


def test_streamed_int4_layers_for_a_gpu_are_packed_once_and_laid_out_as_planned(tmp_path, monkeypatch):
    # Offload to a (faked) H100: each streamed layer is stored on the CPU, packed once while loading for the
    # GPU's fused kernel (the CUDA packing op emulated: its real shapes from the meta op, filled bytes) and
    # streamed as packed, nothing else; the CPU kernels are built for the layers that compute on the CPU.
    import quantization.layers
    from glm.checkpoint import ShardedCheckpoint
    from glm.loading import load_weights
    from glm.offload import laid_out_for
    from glm.offload.planner import streamable_units, unit_bytes
    from glm.offload.stores import DiskStore
    from glm.offload.streamer import WeightStreamer
    from glm.quantize import quantization_transform
    from quantization.cuda import pack_int4

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    packed_on = []

    def pack_on_the_gpu(weight, scale, size, device):
        packed_on.append(device.type)
        meta = torch.device("meta")
        packed, pairs = pack_int4(weight.to(meta), scale.to(meta), size, meta)
        return torch.full(packed.shape, 7, device=weight.device), torch.ones(
            pairs.shape, device=weight.device
        )

    monkeypatch.setattr(quantization.layers, "pack_int4", pack_on_the_gpu)
    builds = []
    monkeypatch.setattr(quantization.layers, "native_kernels", lambda: builds.append(1))
    config = GLMConfig(2, 128, 4, 128, 64, 32)  # every matrix's in_features a multiple of 128: all pack
    folder = save_checkpoint(init_random_weights(GLM(config), seed=1).state_dict(), tmp_path / "ckpt", config)
    with torch.device("meta"):
        model = quantization_transform(4)(GLM(config))
    gpu = torch.device("cuda")
    packed = laid_out_for(model, gpu)
    planned = dict(streamable_units(packed))
    sizes = [unit_bytes(m, torch.float16) for m in planned.values()]
    budget = plan_offload(packed, None, torch.float16).fixed_bytes + 2 * max(sizes) + sum(sizes[:2])
    plan = plan_offload(packed, budget, torch.float16)  # two buffers and the first two matrices resident
    assert len(plan.resident_units) == 2 and len(plan.streamed_units) == len(planned) - 2
    model.offload = WeightStreamer(model, plan, gpu, DiskStore(tmp_path / "offload"))
    load_weights(model, ShardedCheckpoint(folder), torch.float16, torch.device("cpu"))
    for unit in model.offload.units:
        assert unit.module.compute_device == gpu and unit.module.weight is None
        assert [e.name for e in unit.entries] == ["bias", "weight_int4pack", "weight_int4pack_scale"]
        assert unit.nbytes == unit_bytes(planned[unit.name], torch.float16)  # as the planner counted
        offsets = [e.slot_offset for e in unit.entries]
        assert offsets == sorted(offsets) and offsets[0] == 0  # one after another, no hole left
        assert (unit.entries[1].stored == 7).all()  # the packed bytes went to the store
    assert packed_on.count("cuda") == len(plan.streamed_units)  # once per streamed layer, on the GPU
    assert len(builds) == len(plan.resident_units)  # the resident layers here compute on the CPU


class _NoStream:
    """A CUDA stream or event that does nothing: on the CPU every copy is done when it returns."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record(self, stream: object = None) -> None:
        pass


def test_the_pinned_store_keeps_each_unit_in_one_exact_size_arena(checkpoint, monkeypatch):
    """PinnedStore on the CPU (streams faked, plain memory for pinned): one allocation per unit of exactly
    its buffer layout's size, each tensor a view at its slot offset, reused when sealed again; the logits
    are bit-identical to the resident model's."""
    for name in ("Stream", "Event"):
        monkeypatch.setattr(torch.cuda, name, _NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    allocations: list[int] = []
    freed: list[int] = []

    def allocate(nbytes: int) -> tuple[Tensor, Callable[[], None]]:
        allocations.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8), lambda: freed.append(nbytes)

    def attach(model: GLM) -> GLM:
        plan = plan_offload(model, "40%", torch.float32)
        store = PinnedStore(torch.device("cpu"), plan.buffers, allocate)
        model.offload = WeightStreamer(model, plan, torch.device("cpu"), store)
        return model

    reference, _ = load_model(checkpoint, dtype="float32")
    offloaded, _ = load_model(checkpoint, dtype="float32", transforms=[attach])
    streamer = offloaded.offload
    arenas = streamer.store.arenas.by_unit
    assert len(streamer.units) >= 8 and len(allocations) == len(arenas) == len(streamer.units)
    for unit in streamer.units:
        arena = arenas[unit.name]
        entries = sorted(unit.entries, key=lambda e: e.slot_offset)
        assert [e.name for e in entries] == ["weight", "bias"]
        assert [e.slot_offset for e in entries] == [0, aligned(entries[0].nbytes, SLOT_ALIGN)]
        assert arena.numel() == unit.nbytes == sum(aligned(e.nbytes, SLOT_ALIGN) for e in entries)
        for entry in entries:
            assert entry.stored.data_ptr() == arena.data_ptr() + entry.slot_offset
            assert getattr(entry.owner, entry.name).data_ptr() == entry.stored.data_ptr()  # bound there
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for a, b in zip(forward_passes(reference, ids), forward_passes(offloaded, ids), strict=True):
            assert torch.equal(a, b)
    unit = streamer.units[0]
    before = [e.stored.data_ptr() for e in unit.entries]
    streamer.store.seal(unit)  # sealed again: the same arena, nothing allocated
    assert len(allocations) == len(streamer.units) and not freed
    assert [e.stored.data_ptr() for e in unit.entries] == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_int4_layers_on_cuda_give_the_resident_models_logits(tmp_path):
    from glm.quantize import quantization_transform

    config = GLMConfig(2, 128, 4, 128, 64, 32)
    folder = save_checkpoint(init_random_weights(GLM(config), seed=1).state_dict(), tmp_path / "ckpt", config)
    settings = dict(dtype="float16", device="cuda")
    resident, _ = load_model(folder, transforms=[quantization_transform(4)], **settings)
    offload = Offload("60%", "cuda", torch.float16)
    offloaded, _ = load_model(folder, transforms=[quantization_transform(4), offload], **settings)
    assert streamed(offloaded) and all(u.module.weight is None for u in offloaded.offload.units)  # packed
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]], device="cuda")
    positions = torch.arange(6, device="cuda")[None]
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        assert torch.equal(resident(ids, positions, mask), offloaded(ids, positions, mask))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_bytes_locks_exactly_the_bytes_asked_for():
    nbytes = 3 * SLOT_ALIGN + 5  # far from a power of two
    memory, release = pinned_bytes(nbytes)
    assert memory.numel() == memory.untyped_storage().nbytes() == nbytes and memory.is_pinned()
    assert memory[SLOT_ALIGN:].is_pinned()  # views (an arena's slots) too
    memory.copy_(torch.arange(nbytes) % 251)
    on_device = memory.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), memory)
    release()
    assert not memory.is_pinned()
