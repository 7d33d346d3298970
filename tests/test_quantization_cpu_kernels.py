"""The CPU kernels on quantized weights (quantization/cpu.py, cpu_kernels.cpp) against float64 math.

Decode (<= 8 rows): the AVX2 kernel's contract is exact integer math on the stored values with the
activations rounded to int16 per row, so it is checked against an fp64 emulation of that rounding (to fp32
summation error), for every row count, scale layout, weight-row tail, INT4 32-column tail and flush chunk.
Prefill: dequantised tiles into a reused buffer, against the fp64 matmul on the dequantised weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quantization.cpu
from quantization import QuantizationSpec
from quantization.cpu import CPUKernel, native_kernels, quantized_matmul
from quantization.schemes import dequantize, quantize_to_stored, scale_groups

SPECS = [
    QuantizationSpec(8),
    QuantizationSpec(8, "group", 64),
    QuantizationSpec(4),
    QuantizationSpec(4, "group", 32),
    QuantizationSpec(4, "group", 128),
]
# (out, in): 97 rows leave a 1-row tail after blocks of 4; 160 columns end INT4 rows on a 32-column half
# block; 2080 and 4160 columns span several 2048-column flush chunks, with a 32- and a 64-column rest.
SHAPES = [(97, 256), (8, 160), (12, 2080), (5, 4160)]
CASES = [
    (spec, shape)
    for spec in SPECS
    for shape in SHAPES
    if spec.scheme == "row" or shape[1] % spec.group_size == 0
]


@pytest.fixture(scope="module")
def native():
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("the AVX2 kernels are not available here (no AVX2 or no compiler)")
    return kernels


def stored(spec: QuantizationSpec, out_features: int, in_features: int, seed: int = 0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quantize_to_stored(weight, spec)


def activations(rows: int, in_features: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, 5] = 40.0  # an outlier feature, as GLM's activations have
    return x


def int16_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per row round(x * (32767 / absmax)) * (absmax / 32767), in fp32 steps."""
    absmax = x.abs().amax(dim=1, keepdim=True)
    values = (x * (torch.tensor(32767.0) / absmax)).clamp(-32767, 32767).round()
    return values.double() * (absmax / 32767.0).double()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("spec, shape", CASES, ids=str)
def test_decode_is_exact_math_on_int16_rounded_activations(native, spec, shape):
    out_features, in_features = shape
    weight, scale = stored(spec, out_features, in_features)
    w = dequantize(weight, scale, spec.bits, torch.float64)
    for rows in range(1, 9):
        x = activations(rows, in_features, seed=rows)
        got = CPUKernel(spec.bits)(x, weight, scale)
        assert got.shape == (rows, out_features)
        assert relative_error(got, F.linear(int16_rounded(x), w)) < 1e-6, rows
        # the rounding itself (<= max|x| / 65534 an element): 2e-5 to 3e-4 here, with the outlier
        assert relative_error(got, F.linear(x.double(), w)) < 1e-3, rows


@pytest.mark.parametrize("bits, extremes", [(8, (-128, 127)), (4, (-8, 7))])
def test_largest_sums_do_not_overflow_int32(native, bits, extremes):
    # Every product at its largest magnitude over 4096 columns (two flush chunks): exact in fp64.
    for q in extremes:
        byte = q if bits == 8 else ((q & 0xF) * 0x11 + 128) % 256 - 128  # both nibbles q
        weight = torch.full((8, 4096 * bits // 8), byte, dtype=torch.int8)
        scale = torch.full((8, 1), 0.5, dtype=torch.float16)
        x = torch.full((2, 4096), -3.0)
        got = CPUKernel(bits)(x, weight, scale)
        assert torch.allclose(got, torch.full_like(got, -3.0 * q * 0.5 * 4096), rtol=1e-6, atol=0)


def test_a_row_with_nan_or_inf_gives_nan_in_that_row_only(native):
    for spec in (QuantizationSpec(8), QuantizationSpec(4)):
        weight, scale = stored(spec, 12, 256)
        x = activations(3, 256, seed=0)
        x[1, 7] = float("nan")
        x[2, 9] = float("inf")
        got = CPUKernel(spec.bits)(x, weight, scale)
        assert got[1:].isnan().all()
        expected = F.linear(x[:1].double(), dequantize(weight, scale, spec.bits, torch.float64))
        assert relative_error(got[:1], expected) < 2e-4


def test_zero_rows_give_zeros(native):
    weight, scale = stored(QuantizationSpec(4), 12, 256)
    assert torch.equal(CPUKernel(4)(torch.zeros(2, 256), weight, scale), torch.zeros(2, 12))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_native_dequantize_writes_the_rows_into_the_buffer_exactly(native, spec):
    weight, scale = stored(spec, 13, 256)
    groups = scale_groups(scale).contiguous()
    out = torch.full((10, 256), float("nan"))
    got = native.dequantize(weight[3:], groups[3:], spec.bits, out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize(weight[3:], scale[3:], spec.bits))


@pytest.mark.parametrize("with_native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_prefill_tiles_equal_the_dequantised_matmul(spec, with_native, monkeypatch):
    if not with_native:
        monkeypatch.setattr(quantization.cpu, "native_kernels", lambda: None)
    # 97 rows of 256 float columns in tiles of at most 10 KB: 10 tiles of 10 rows, the last one 7.
    monkeypatch.setattr(quantization.cpu, "PREFILL_TILE_BYTES", 10 * 1024)
    for out_features, in_features in ((97, 256), (40, 1024), (97, 256)):  # the kept buffer regrown, reused
        weight, scale = stored(spec, out_features, in_features)
        x = activations(33, in_features, seed=out_features)
        got = CPUKernel(spec.bits)(x, weight, scale)
        expected = F.linear(x.double(), dequantize(weight, scale, spec.bits, torch.float64))
        assert got.shape == (33, out_features)
        assert relative_error(got, expected) < 1e-6


@pytest.mark.parametrize("with_native", [True, False], ids=["native", "python"])
def test_bf16_prefill_tiles_equal_the_dequantised_matmul(with_native, monkeypatch):
    # The dtype AVX512-BF16 / AMX machines prefill in: each fp32 tile is cast into a kept bf16 buffer.
    if not with_native:
        monkeypatch.setattr(quantization.cpu, "native_kernels", lambda: None)
    monkeypatch.setattr(quantization.cpu, "PREFILL_TILE_BYTES", 10 * 1024)
    weight, scale = stored(QuantizationSpec(4), 97, 256)
    x = activations(33, 256, seed=3)
    got = quantized_matmul(x, weight, scale, 4, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    expected = F.linear(x.double(), dequantize(weight, scale, 4, torch.float64))
    assert relative_error(got, expected) < 1e-2


def test_prefill_keeps_autograd_through_the_activations():
    weight, scale = stored(QuantizationSpec(4), 24, 256)
    x = activations(16, 256, seed=1).requires_grad_()
    quantized_matmul(x, weight, scale, 4, torch.float32).sum().backward()
    expected = dequantize(weight, scale, 4).sum(dim=0).expand(16, -1)
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_group_widths_the_kernel_cannot_take_use_the_fallbacks(bits):
    # Groups of 16 columns (not a multiple of 32): the Python dequantise + fp32 matmul for decode and
    # prefill alike (fp32 rounding of 128-term sums).
    spec = QuantizationSpec(bits, "group", 16)
    weight, scale = stored(spec, 24, 128)
    expected_w = dequantize(weight, scale, bits, torch.float64)
    for rows, tolerance in ((2, 1e-6), (16, 1e-6)):
        x = activations(rows, 128, seed=rows)
        got = CPUKernel(bits)(x, weight, scale)
        assert relative_error(got, F.linear(x.double(), expected_w)) < tolerance
