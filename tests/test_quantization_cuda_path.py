"""The CUDA quantization path, proven on the CPU where it can be: tinygemm's operands through torch's CPU twin
of the fused INT4 op, the gates (capability, torch version, shapes), the one packed copy a layer keeps, the
contiguous rows the fused op gets, the tiled dequantisation; CUDA-only checks at the end (skipped without a
GPU).

What the CPU proves and what it does not. torch's CPU twin `_weight_int4pack_mm_for_cpu` computes with
tinygemm's dequantisation `(u - 8) * scale + zero` and its scales_and_zeros [K / size, N, 2], so the CPU
tests prove the unsigned conversion (`byte ^ 0x88`), the nibble order the project's bytes are read in
(column 2i high; swapped nibbles give errors ~1), the per-kernel-group scales (per-row INT4 through repeated
scales) and the zeros. The CPU twin packs int32 [N, K] unpacked values, while CUDA's
`_convert_weight_to_int4pack` (torch >= 2.5) takes the uint8 [N, K / 2] bytes themselves: that it reads
column 2i from the high nibble is torch's convention (its tests and torchao pack `q[:, ::2] << 4 |
q[:, 1::2]`), checked here only by the `cuda` tests on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantization.cuda
import quantization.layers
from quantization import QuantizationSpec, QuantizedLinear, QuantizedOutputLayer
from quantization.cuda import (
    CUDAKernel,
    Int4PackKernel,
    fused_int4_available,
    fused_int4_group_size,
)
from quantization.schemes import dequantize, pack_int4, quantize_to_stored
from quantization.tinygemm import (
    kernel_group_size,
    scales_and_zeros,
    unsigned_bytes,
    unsigned_values,
)

# bf16 activations and scales (8 significant bits: ~2^-9 relative rounding each) against fp64 math on the
# dequantised weight, 512-term sums: measured 2.2e-3 to 2.6e-3. A wrong nibble order gives ~1.4.
BF16_TOLERANCE = 5e-3
CUDA = torch.device("cuda")


def stored(spec: QuantizationSpec, out_features: int = 64, in_features: int = 512, seed: int = 0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quantize_to_stored(weight, spec)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def fake_capability(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


# tinygemm's operands ------------------------------------------------------------------------------------


def test_xor_0x88_adds_8_to_both_signed_nibbles_of_every_byte():
    def signed(nibble: int) -> int:
        return nibble - 16 if nibble >= 8 else nibble

    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.int8)[None, :]
    got = unsigned_values(unsigned_bytes(every_byte))[0].tolist()
    expected = [signed(b >> 4) + 8 for b in range(256)], [signed(b & 15) + 8 for b in range(256)]
    assert got[0::2] == expected[0] and got[1::2] == expected[1]


def test_unsigned_values_keep_the_column_order_of_the_stored_bytes():
    values = torch.tensor([[1, -2, 3, -4, -7, 7, 0, -8]], dtype=torch.int8)
    packed = pack_int4(values)
    assert (packed.view(torch.uint8) ^ 0x88).tolist() == [[0x96, 0xB4, 0x1F, 0x80]]  # (1+8, -2+8), ...
    assert unsigned_values(unsigned_bytes(packed)).tolist() == [[9, 6, 11, 4, 1, 15, 8, 0]]


def test_scales_and_zeros_repeat_each_stored_groups_scale_per_kernel_group():
    per_row = torch.tensor([0.5, 0.25], dtype=torch.float16)
    pairs = scales_and_zeros(per_row, 1024, 256)
    assert pairs.shape == (4, 2, 2) and pairs.dtype == torch.bfloat16
    assert pairs[..., 0].tolist() == [[0.5, 0.25]] * 4 and not pairs[..., 1].any()
    two_groups = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)  # 256 columns each
    assert scales_and_zeros(two_groups, 512, 128)[..., 0].tolist() == [[1, 3], [1, 3], [2, 4], [2, 4]]


@pytest.mark.parametrize(
    "spec,groups",
    [(QuantizationSpec(4), None), (QuantizationSpec(4, "group", 32), None),
     (QuantizationSpec(4, "group", 128), None), (QuantizationSpec(4), 4)],  # 4: merged from 4 TP shards
    ids=["row", "group32", "group128", "row-merged-4"],
)  # fmt: skip
def test_the_packed_product_is_the_dequantised_matmul_and_swapped_nibbles_are_not(spec, groups):
    weight, scale = stored(spec)
    if groups is not None:  # a row-parallel layer merged from shards: one scale per shard's columns
        scale = (torch.rand(64, groups, generator=torch.Generator().manual_seed(1)) * 2e-3 + 1e-3).half()
    size = kernel_group_size(512, 1 if scale.dim() == 1 else scale.shape[1])
    pairs = scales_and_zeros(scale, 512, size)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = x.double() @ dequantize(weight, scale, 4, torch.float64).t()
    unsigned = unsigned_bytes(weight)  # what the CUDA path hands _convert_weight_to_int4pack

    def product(values: torch.Tensor) -> torch.Tensor:
        packed = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32).contiguous(), 1)
        return torch._weight_int4pack_mm_for_cpu(x, packed, size, pairs)

    high_first = torch.stack([unsigned >> 4, unsigned & 15], dim=-1).flatten(-2)  # torch's CUDA order
    low_first = torch.stack([unsigned & 15, unsigned >> 4], dim=-1).flatten(-2)
    assert relative_error(product(high_first), expected) < BF16_TOLERANCE
    assert relative_error(product(low_first), expected) > 0.5


# The gates ----------------------------------------------------------------------------------------------


def test_the_fused_path_needs_sm80_and_torch_2_5_and_warns_once_naming_the_fix(monkeypatch):
    quantization.cuda._warn_old_torch.cache_clear()
    fake_capability(monkeypatch, (7, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fused_int4_available(CUDA)  # a 2080 Ti: no warning, nothing to fix
    fake_capability(monkeypatch, (9, 0))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    assert fused_int4_available(CUDA)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.warns(UserWarning, match=r"torch 2\.4\.1\+cu121 .*dequantise.*install torch >= 2\.5"):
        assert not fused_int4_available(CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fused_int4_available(CUDA)  # once per process
    quantization.cuda._warn_old_torch.cache_clear()


def test_tinygemm_tiles_n_by_8_and_k_by_128_with_a_group_width_it_takes():
    assert fused_int4_group_size(64, 512, 1) == 256
    assert fused_int4_group_size(64, 512, 16) == 32
    assert fused_int4_group_size(12, 512, 1) is None  # out_features not a multiple of 8
    assert fused_int4_group_size(64, 192, 1) is None  # in_features not a multiple of 128
    assert fused_int4_group_size(64, 384, 8) is None  # groups of 48 columns: no kernel group fits


def meta_layer(spec: QuantizationSpec, out_features: int = 64, in_features: int = 512) -> QuantizedLinear:
    with torch.device("meta"):
        return QuantizedLinear(nn.Linear(in_features, out_features), spec)


def tensors(layer: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in [*layer.named_parameters(), *layer.named_buffers()]}


def test_a_layer_on_a_fused_device_keeps_only_the_packed_weight(monkeypatch):
    fake_capability(monkeypatch, (8, 0))
    layer = meta_layer(QuantizationSpec(4))
    layer.prepare(CUDA)  # as finish_loading on an A100 (the weights here on meta)
    assert tensors(layer) == {
        "bias": ((64,), torch.float32),
        "weight_int4pack": ((64 // 8, 512 // 128, 32, 4), torch.int32),  # N * K / 2 bytes, as stored
        "weight_int4pack_scale": ((512 // 256, 64, 2), torch.bfloat16),
    }
    assert isinstance(layer._kernel, Int4PackKernel) and layer._kernel.group_size == 256


@pytest.mark.parametrize(
    "spec,out_features,capability",
    [(QuantizationSpec(4), 12, (8, 0)), (QuantizationSpec(8), 64, (8, 0)), (QuantizationSpec(4), 64, (7, 0))],
    ids=["n-not-a-multiple-of-8", "int8", "v100"],
)
def test_layers_the_fused_op_cannot_take_keep_their_stored_weight(
    monkeypatch, spec, out_features, capability
):
    fake_capability(monkeypatch, capability)
    layer = meta_layer(spec, out_features)
    before = tensors(layer)
    layer.prepare(CUDA)
    assert tensors(layer) == before and layer.weight_int4pack is None
    assert isinstance(quantization.layers.make_kernel(spec.bits, CUDA), CUDAKernel)  # dequantises


def test_the_fused_op_gets_contiguous_bf16_rows(monkeypatch):
    calls = []

    def fake_op(rows, packed, group_size, scales_zeros):
        calls.append((rows.is_contiguous(), rows.dtype, rows.clone(), group_size))
        return torch.ones(rows.shape[0], 16, dtype=rows.dtype)

    monkeypatch.setattr(torch, "_weight_int4pack_mm", fake_op)
    wide = torch.randn(2, 3, 1024).bfloat16()
    x = wide[..., :512]  # a view of wider rows: its reshape is not contiguous
    assert not x.reshape(-1, 512).is_contiguous()
    y = Int4PackKernel(128)(x, torch.empty(0), torch.empty(0))
    contiguous, dtype, rows, group_size = calls[0]
    assert contiguous and dtype == torch.bfloat16 and group_size == 128
    assert torch.equal(rows, x.reshape(-1, 512))
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    Int4PackKernel(128)(torch.randn(4, 512), torch.empty(0), torch.empty(0))  # fp32 activations
    assert calls[1][:2] == (True, torch.bfloat16)


# Dequantising in tiles (the INT8 and unfused path; plain torch ops, run here on CPU tensors) --------------


def test_cuda_kernel_dequantises_a_tile_of_rows_at_a_time(monkeypatch):
    dequantised_rows = []

    def recording(weight, scale, bits, dtype=torch.float32):
        dequantised_rows.append(weight.shape[0])
        return dequantize(weight, scale, bits, dtype)

    monkeypatch.setattr(quantization.cuda, "dequantize", recording)
    monkeypatch.setattr(quantization.cuda, "DEQUANTIZE_TILE_BYTES", 10 * 512 * 4)  # 10 fp32 rows of 512
    for spec in (QuantizationSpec(8), QuantizationSpec(4, "group", 32)):
        weight, scale = stored(spec, out_features=64)
        x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(3))
        expected = x.double() @ dequantize(weight, scale, spec.bits, torch.float64).t()
        got = CUDAKernel(spec.bits)(x, weight, scale)
        assert got.shape == (2, 3, 64)
        assert relative_error(got, expected) < 1e-6  # fp32 sums of 512 terms, in another order
    assert dequantised_rows == [10] * 6 + [4] + [10] * 6 + [4]


def test_the_int8_output_layer_on_cuda_dequantises_in_tiles(monkeypatch):
    # The [vocab / TP, hidden] copy never dequantises at once: the layer takes the CUDA kernel (run here on
    # CPU tensors), which goes a tile of rows at a time.
    biggest = []

    def recording(weight, scale, bits, dtype=torch.float32):
        biggest.append(weight.shape[0])
        return dequantize(weight, scale, bits, dtype)

    monkeypatch.setattr(quantization.cuda, "dequantize", recording)
    monkeypatch.setattr(quantization.cuda, "DEQUANTIZE_TILE_BYTES", 100 * 64 * 4)
    monkeypatch.setattr(quantization.layers, "make_kernel", lambda bits, device: CUDAKernel(bits))
    embedding = nn.Embedding(1000, 64)
    head = QuantizedOutputLayer(embedding)
    head.finish_loading()
    x = torch.randn(5, 64)
    expected = x.double() @ dequantize(head.weight_q, head.weight_scale, 8, torch.float64).t()
    assert relative_error(head(x), expected) < 1e-6
    assert max(biggest) == 100 and len(biggest) == 10


# The CPU kernels are built only for a CPU compute device ------------------------------------------------


@pytest.mark.parametrize(
    "compute_device,built", [(None, True), (CUDA, False)], ids=["cpu", "offloaded-to-cuda"]
)
def test_native_kernels_are_built_only_when_the_layer_computes_on_the_cpu(monkeypatch, compute_device, built):
    fake_capability(monkeypatch, (7, 5))  # no packing: the weight stays where the loader put it
    builds = []
    monkeypatch.setattr(quantization.layers, "native_kernels", lambda: builds.append(1))
    layer = meta_layer(QuantizationSpec(8))
    layer.compute_device = compute_device  # offload sets it on the layers it streams (stored on the CPU)
    cpu = torch.device("cpu")
    layer.load_weight("weight", torch.randn(64, 512), torch.float32, cpu)
    layer.load_weight("bias", torch.randn(64), torch.float32, cpu)
    layer.finish_loading()
    assert layer.weight.device == cpu and bool(builds) == built


# On a GPU -----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "spec",
    [QuantizationSpec(4), QuantizationSpec(4, "group", 32), QuantizationSpec(4, "group", 128)],
    ids=str,
)
@pytest.mark.parametrize("rows", [1, 64])
def test_a_loaded_int4_layer_on_cuda_equals_the_dequantised_reference(spec, rows):
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = meta_layer(spec, 256, 1024)
    layer.load_weight("weight", weight.half(), torch.float16, CUDA)
    layer.load_weight("bias", torch.zeros(256), torch.float16, CUDA)
    reference_weight = dequantize(layer.weight, layer.weight_scale, 4, torch.float64)
    layer.finish_loading()
    assert (layer.weight is None) == fused_int4_available(CUDA)  # packed where the fused op runs
    x = torch.randn(rows, 1024, device=CUDA).half()
    with torch.no_grad():
        got = layer(x)
    assert relative_error(got, x.double() @ reference_weight.t()) < 1e-2  # bf16 activations, fp16 output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_int8_output_layer_on_cuda_equals_the_dequantised_logits():
    embedding = nn.Embedding(3000, 1024, device=CUDA, dtype=torch.float16)
    head = QuantizedOutputLayer(embedding)
    head.finish_loading()
    x = torch.randn(3, 1024, device=CUDA).half()
    expected = x.double() @ dequantize(head.weight_q, head.weight_scale, 8, torch.float64).t()
    assert relative_error(head(x), expected) < 1e-2  # fp16 dequantised weight and output
    assert relative_error(F.linear(x.float(), embedding.weight.float()), expected) < 0.05  # INT8 error
