"""The memory planner against the original's hardware table and figures, hand counts and a measured run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_offload import MEMORY_CONFIG, build_memory_checkpoint, probe
from torch import nn

from glm.config import get_preset
from glm.plan import ORIGINAL_HARDWARE, build_meta_model, hardware_table, plan_memory, run_transforms
from glm.plan import main as plan_main
from quantization import QuantizedLinear

GLM_130B = get_preset("glm-130b")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_memory_checkpoint(tmp_path_factory.mktemp("plan") / "ckpt")


@pytest.fixture(scope="module")
def table():
    return {(r["hardware"], r["bits"]): r for r in hardware_table(GLM_130B)}


@pytest.mark.parametrize("hardware,gpus,memory,bits,offload", ORIGINAL_HARDWARE)
def test_every_row_of_the_original_hardware_table(table, hardware, gpus, memory, bits, offload):
    row = table[(hardware, bits)]
    if offload:  # 8 x V100 in FP16: only with BMInf's 25 GB per-GPU weight limit
        assert not row["plain"].fits
        assert row["with_offload"].fits
        assert row["with_offload"].offload.streamed_units
    else:
        assert row["plain"].fits


@pytest.mark.parametrize(
    "gpus,memory,bits",
    [(4, "24GiB", 8), (8, "11GiB", 8), (4, "24GiB", None), (8, "11GiB", None), (4, "40GiB", None)],
)
def test_what_the_original_does_not_list_does_not_fit(gpus, memory, bits):
    assert not plan_memory(GLM_130B, gpus, bits, device_memory=memory).fits


def test_int4_weights_are_about_70_gb():
    plan = plan_memory(GLM_130B, 1, 4, max_length=8)
    assert abs(plan.weight_bytes - 70e9) <= 0.05 * 70e9


def test_fp16_weights_match_a_parameter_count_by_hand():
    # 128.7 B parameters (the reference's count from the shapes) in fp16, on one device.
    plan = plan_memory(GLM_130B, 1, None, max_length=8)
    assert plan.weight_bytes == 2 * GLM_130B.num_parameters()
    assert abs(GLM_130B.num_parameters() - 128.7e9) < 0.1e9


def test_a_rank_holds_its_share_and_the_replicated_tensors():
    h, layers = GLM_130B.hidden_size, GLM_130B.num_layers
    replicated = layers * (4 * h + 2 * h) + 2 * h  # LayerNorms, row-parallel biases, final LayerNorm
    per_rank = (GLM_130B.num_parameters() - replicated) // 8 + replicated
    assert plan_memory(GLM_130B, 8, None, max_length=8).weight_bytes == 2 * per_rank


@pytest.mark.parametrize("bits,tp", [(4, 4), (8, 8), (None, 8)])
def test_cuda_weights_are_what_the_loaded_layers_hold(monkeypatch, bits, tp):
    # GLM-130B's rank as loading on an H100 leaves it (the layers prepared for a faked sm_90 device, their
    # weights on meta), counted tensor by tensor: fp16 parameters, buffers in their own dtypes.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    model = build_meta_model(GLM_130B, run_transforms(tp, bits))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.prepare(torch.device("cuda"))
    tensors = [*model.parameters(), *model.buffers()]
    held = sum(t.numel() * (2 if isinstance(t, nn.Parameter) else t.element_size()) for t in tensors)
    assert plan_memory(GLM_130B, tp, bits, max_length=8).weight_bytes == held
    if bits == 4:  # one copy: tinygemm's packed weight (N * K / 2 bytes) and bf16 (scale, 0) per 256 columns
        h, inner = GLM_130B.hidden_size, GLM_130B.inner_hidden_size
        shapes = [(3 * h // tp, h), (h, h // tp), (2 * inner // tp, h), (h, inner // tp)]  # (N, K)
        per_layer = sum(n * k // 2 + k // 256 * n * 2 * 2 for n, k in shapes)
        assert all(layer.weight is None and layer.weight_scale is None for layer in layers)
        quantized = sum(t.numel() * t.element_size() for layer in layers for t in layer.buffers())
        assert quantized == GLM_130B.num_layers * per_layer


def test_kv_cache_is_3_4_mb_per_token():
    plan = plan_memory(GLM_130B, 1, None, max_length=2048)
    assert plan.kv_cache == 2 * 12288 * 2 * 70 * 2048  # 2 x hidden fp16 values per token per layer
    assert plan.kv_cache / 2048 == pytest.approx(3.44e6, rel=0.01)


def test_offload_plan_respects_the_budget():
    plan = plan_memory(GLM_130B, 8, None, max_memory="25GiB", device_memory="32GiB")
    assert plan.device_weights <= 25 * 1024**3
    assert plan.offload.streamed_bytes + plan.offload.resident_bytes == plan.weight_bytes


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS")
@pytest.mark.parametrize("batch,length", [(1, 32), (4, 256)])
def test_plan_is_within_10_percent_of_a_measured_run(checkpoint, batch, length):
    # Measured where glibc gives freed blocks back (as offload sets it): with its default the heap keeps
    # freed activations, +11 % at batch 4 x 256 here, which is the allocator's, not the model's.
    measured = probe(checkpoint, "none", batch, length, {"MALLOC_MMAP_THRESHOLD_": "131072"})["run_peak"]
    plan = plan_memory(
        MEMORY_CONFIG, dtype=torch.float32, device_type="cpu", batch_size=batch, max_length=length
    )
    assert plan.total == pytest.approx(measured, rel=0.10)


def test_cli_says_fits_or_prints_the_offload_needed(capsys):
    common = ["--max-length", "512"]
    assert plan_main([*common, "--config", "glm-130b-int4", "--device-memory", "24GiB"]) == 0
    assert "fits in 24.00 GiB" in capsys.readouterr().out
    assert plan_main([*common, "--config", "glm-130b", "--device-memory", "24GiB"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "with offload (--max-memory" in out
    assert plan_main([*common, "--config", "glm-130b", "--max-memory", "lots"]) == 2
    assert capsys.readouterr().err.startswith("error: memory 'lots'")


def test_a_config_naming_a_checkpoint_plans_its_stored_shape():
    from glm.api import DEFAULT_MODEL
    from glm.checkpoint import read_metadata
    from glm.config import GLMConfig

    shape = GLMConfig.from_dict(read_metadata(DEFAULT_MODEL)["model"])
    out = subprocess.run(
        [sys.executable, "-m", "glm.plan", "--config", "glm-bilingual", "--device-memory", "1GiB"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "fits in 1.00 GiB" in out.stdout
    total = f"weights total {shape.num_parameters() * 4 / 1e9:.2f} GB"  # fp32 on the CPU
    assert " ".join(total.split()) in " ".join(out.stdout.split())
