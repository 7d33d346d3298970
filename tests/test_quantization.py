"""INT8 / INT4 weight-only quantization: schemes against hand-computed bytes, kernels against the
dequantised fp64 reference math, and quantized sat_tiny against a plain model holding the dequantised
weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_fp32_close, assert_model_close

import quantization.layers
from glm.checkpoint import (
    CheckpointError,
    ShardedCheckpoint,
    read_metadata,
    save_checkpoint,
    write_checkpoint,
)
from glm.config import get_preset
from glm.loading import load_model
from glm.model import GLM
from glm.quantize import quantization_transform
from glm.quantized_checkpoint import (
    ConversionPlan,
    checkpoint_transform,
    quantization_metadata,
    quantize_checkpoint_tensor,
)
from glm.sharding import merge_tensors, split_tensor
from quantization import QuantizationSpec, QuantizedLinear
from quantization.cpu import CPUKernel, native_kernels
from quantization.schemes import dequantize, pack_int4, quantize_weight, unpack_int4

SAT_TINY = Path(__file__).parent / "data" / "sat_tiny"
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
SPECS = [QuantizationSpec(8), QuantizationSpec(4), QuantizationSpec(4, "group", 32)]
# sat_tiny's dense_4h_to_h has 160 input columns (80 per shard at TP 2, 40 at TP 4): groups of 8 there.
TP_SPECS = [*SPECS[:2], QuantizationSpec(4, "group", 8)]
# Kernel tolerances (relative Frobenius error of the output against fp64 math on the dequantised weight):
# the AVX2 kernel rounds activations to int16 per row (<= max|x| / 65534 per element): measured ~3e-5.
# torch's built-in weight-only ops take bf16 activations (8 significant bits): measured ~2e-3; they serve
# bf16 models only. fp32 dequantise + matmul (prefill, and decode without the kernels): fp32 rounding of
# 256-term sums, ~1e-7.
NATIVE_TOLERANCE, BUILTIN_TOLERANCE, FP32_TOLERANCE = 2e-4, 1e-2, 1e-6


def reference_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return F.linear(x.double(), dequantize(weight, scale, bits, torch.float64)).to(x.dtype)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


# Schemes and packing -------------------------------------------------------------------------------------


def test_int4_bytes_of_a_hand_made_matrix_are_the_originals_layout():
    # Column 2i in the high nibble, 2i + 1 in the low one, two's complement nibbles.
    values = torch.tensor([[1, -2, 7, -7], [-1, 3, 0, -8]], dtype=torch.int8)
    expected = torch.tensor([[0x1E, 0x79], [0xF3 - 256, 0x08]], dtype=torch.int8)
    assert torch.equal(pack_int4(values), expected)
    assert torch.equal(unpack_int4(expected), values)


def test_pack_unpack_round_trips_every_nibble_pair():
    values = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8).reshape(16, 32)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    every_byte = torch.arange(-128, 128, dtype=torch.int8).reshape(8, 32)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_per_row_scales_and_values_are_hand_computed():
    weight = torch.tensor([[1.27, -0.635, 0.0, 0.127], [0.7, -0.35, 0.1, 0.0]])
    values, scale = quantize_weight(weight, QuantizationSpec(8))
    assert torch.equal(scale, torch.tensor([0.01, 0.7 / 127]).half())
    assert values[0].tolist() == [127, -63, 0, 13]  # fp16(0.01) = 0.0100021: 126.97, -63.49, 12.70
    values, scale = quantize_weight(weight[1:], QuantizationSpec(4))
    assert torch.equal(scale, torch.tensor([0.1]).half())  # absmax / 7
    assert values.tolist() == [[7, -4, 1, 0]]  # fp16(0.1) = 0.0999756: 7.0017, -3.5009, 1.0002
    assert torch.equal(pack_int4(values), torch.tensor([[0x7C, 0x10]], dtype=torch.int8))


def test_group_scales_cover_consecutive_columns():
    weight = torch.tensor([[0.7, -0.1, 0.0, 1.4], [0.0, 0.0, -0.07, 0.07]])
    values, scale = quantize_weight(weight, QuantizationSpec(4, "group", 2))
    assert scale.shape == (2, 2)
    assert torch.equal(scale, (torch.tensor([[0.7, 1.4], [0.0, 0.07]]) / 7).half())
    assert values.tolist() == [[7, -1, 0, 7], [0, 0, -7, 7]]  # an all-zero group: scale 0, values 0
    expected = values.float().reshape(2, 2, 2) * scale.float()[..., None]
    assert torch.equal(dequantize(pack_int4(values), scale, 4), expected.reshape(2, 4))


def original_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-130B's quantization/layers.py, transcribed (fp16 weights, the division in fp16)."""
    scale = (weight.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    values = torch.round(weight / scale[:, None]).to(torch.int8)
    if bits == 4:  # int4WeightCompression: (w[2i] << 4) | (w[2i+1] & 0x0F), byte by byte
        rows = [
            [((int(r[2 * i]) << 4) | (int(r[2 * i + 1]) & 0x0F)) for i in range(len(r) // 2)] for r in values
        ]
        values = torch.tensor(rows, dtype=torch.int32).to(torch.uint8).view(torch.int8)
    return values, scale


@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_weights_quantize_to_the_originals_bytes_and_dequantise_bit_for_bit(bits):
    weight = (torch.randn(48, 64, generator=torch.Generator().manual_seed(bits)) * 0.05).half()
    expected_weight, expected_scale = original_quantize(weight, bits)
    got = quantize_checkpoint_tensor(
        "transformer.layers.0.attention.dense.weight", weight, QuantizationSpec(bits)
    )
    assert torch.equal(got["transformer.layers.0.attention.dense.weight"], expected_weight)
    assert torch.equal(got["transformer.layers.0.attention.dense.weight_scale"], expected_scale)
    # The original's half kernel: out[i] = half(w[i]) * scale[row], each nibble sign-extended.
    if bits == 8:
        values = expected_weight
    else:
        packed = expected_weight.to(torch.int32)
        values = torch.stack([packed >> 4, ((packed << 28) >> 28)], -1).flatten(1)
    original = values.half() * expected_scale[:, None]
    assert torch.equal(dequantize(expected_weight, expected_scale, bits, torch.float16), original)


def test_bad_specs_are_one_line_errors():
    with pytest.raises(ValueError, match="choose 4 or 8"):
        QuantizationSpec(3)
    with pytest.raises(ValueError, match="not divisible by the quantization group size"):
        QuantizationSpec(4, "group", 128).groups(96)
    with pytest.raises(ValueError, match="give no group size"):
        QuantizationSpec(4, "row", 64)


# Kernels -------------------------------------------------------------------------------------------------


def quantized(spec: QuantizationSpec, out_features: int = 96, in_features: int = 256, seed: int = 0):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    entries = quantize_checkpoint_tensor("transformer.layers.0.mlp.dense_4h_to_h.weight", weight, spec)
    return entries["transformer.layers.0.mlp.dense_4h_to_h.weight"], entries[
        "transformer.layers.0.mlp.dense_4h_to_h.weight_scale"
    ]


@pytest.mark.parametrize("path", ["native", "torch"])  # every path this machine can take
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8, 33])  # up to 8: the decode kernel; 33: dequantise + matmul
def test_cpu_kernel_equals_the_dequantised_reference(spec, rows, path, monkeypatch):
    if path == "native" and native_kernels() is None:
        pytest.skip("the AVX2 kernels are not available here (no AVX2, no compiler or GLM_NATIVE_ISA=none)")
    if path == "torch":
        monkeypatch.setattr(quantization.cpu, "native_kernels", lambda: None)
    weight, scale = quantized(spec)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)) * 3
    x[:, 5] = 40.0  # an outlier feature, as GLM's activations have
    got = CPUKernel(spec.bits)(x, weight, scale)
    expected = reference_linear(x, weight, scale, spec.bits)
    assert got.shape == (rows, 96)
    tolerance = NATIVE_TOLERANCE if path == "native" and rows <= 8 else FP32_TOLERANCE
    assert relative_error(got, expected) < tolerance


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_builtin_fallback_kernels_equal_the_dequantised_reference(spec, monkeypatch):
    # Without the native kernels a bf16 model's decode takes torch's fused weight-only ops.
    monkeypatch.setattr(quantization.cpu, "native_kernels", lambda: None)
    weight, scale = quantized(spec)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = CPUKernel(spec.bits)(x, weight, scale)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, reference_linear(x.float(), weight, scale, spec.bits)) < BUILTIN_TOLERANCE


def test_multi_group_int8_kernels_sum_each_groups_products():
    # A row-parallel INT8 layer merged from 4 shards: 4 scales per row.
    weight, _ = quantized(QuantizationSpec(8))
    scale = (torch.rand(96, 4, generator=torch.Generator().manual_seed(2)) * 1e-3).half()
    x = torch.randn(1, 256)
    expected = reference_linear(x, weight, scale, 8)
    assert relative_error(CPUKernel(8)(x, weight, scale), expected) < NATIVE_TOLERANCE
    assert relative_error(CPUKernel(8)._int8pack(x.bfloat16(), weight, scale), expected) < BUILTIN_TOLERANCE


# The quantized model -------------------------------------------------------------------------------------


def reference_kernel(bits: int, device: torch.device):
    return lambda x, weight, scale: F.linear(x, dequantize(weight, scale, bits, x.dtype))


def load_sat_tiny(transforms=(), folder: Path = SAT_TINY / "ckpt") -> GLM:
    model, _ = load_model(folder, config=get_preset("sat-tiny"), transforms=transforms)
    return model


def dequantised_copy(quantized_model: GLM) -> GLM:
    """A plain fp32 model with the quantized model's weights dequantised, everything else copied."""
    plain = GLM(quantized_model.config)
    state = {k: v for k, v in quantized_model.state_dict().items() if not k.endswith("weight_scale")}
    for index, layer in enumerate(quantized_model.transformer.layers):
        for name in LINEARS:
            module = layer.get_submodule(name)
            key = f"transformer.layers.{index}.{name}.weight"
            state[key] = dequantize(module.weight, module.weight_scale, module.spec.bits)
    plain.load_state_dict(state)
    return plain.eval()


def forward(model: GLM, reference: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-sequence logits (12 rows: the prefill path) and token-by-token logits (the decode path)."""
    tokens, positions, mask = reference["tokens"], reference["position_ids"], reference["attention_mask"]
    with torch.no_grad():
        full = model(tokens, positions, mask)
        cache = model.new_cache(1, 12)
        steps = [model(tokens[:, i : i + 1], positions[:, i : i + 1], mask[:, :, i : i + 1, : i + 1], cache)
                 for i in range(12)]  # fmt: skip
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantized_sat_tiny_equals_a_plain_model_holding_the_dequantised_weights(
    spec, reference, monkeypatch
):
    transform = quantization_transform(spec.bits, spec.scheme, spec.group_size)
    model = load_sat_tiny([transform])
    assert isinstance(model.transformer.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    plain = dequantised_copy(model)
    expected_full, expected_steps = forward(plain, reference)
    assert (expected_full - reference["logits_full"]).abs().max() > 1e-3  # quantization did change them
    got_full, got_steps = forward(model, reference)  # the CPU kernels
    assert_model_close(got_full, expected_full, model.config)  # fp32 dequantise + matmul
    scale = expected_steps.abs().max()
    assert (got_steps - expected_steps).abs().max() < 1e-3 * scale  # decode kernel (see NATIVE_TOLERANCE)
    monkeypatch.setattr(quantization.layers, "make_kernel", reference_kernel)
    exact = load_sat_tiny([transform])
    for got, expected in zip(forward(exact, reference), (expected_full, expected_steps), strict=True):
        # fp32 against fp32 in another summation order (a fused bias, another kernel)
        assert_model_close(got, expected, exact.config)


def test_biases_layer_norms_and_embeddings_stay_full_precision(sat_tiny):
    model = load_sat_tiny([quantization_transform(4)])
    plain = dict(sat_tiny.named_parameters())
    kept = dict(model.named_parameters())
    assert set(plain) - set(kept) == {f"transformer.layers.{i}.{n}.weight" for i in (0, 1) for n in LINEARS}
    for name, got in kept.items():
        assert got.dtype == torch.float32
        assert torch.equal(got, plain[name]), name
    bias = model.transformer.layers[0].attention.query_key_value.bias
    assert bias.abs().max() > 0  # the original's quantize-after-load path replaced these with zeros


def test_int8_output_layer_gives_the_dequantised_embedding_logits(sat_tiny, reference, monkeypatch):
    monkeypatch.setattr(quantization.layers, "make_kernel", reference_kernel)
    model = load_sat_tiny([quantization_transform(8, output_layer=True)])
    plain = dequantised_copy(model)
    head = model.output_layer
    embedding = dequantize(head.weight_q, head.weight_scale, 8)
    tokens, positions, mask = reference["tokens"], reference["position_ids"], reference["attention_mask"]
    hidden = []
    plain.output_layer.register_forward_hook(lambda m, i, o: hidden.append(i[0]))
    with torch.no_grad():
        plain(tokens, positions, mask)
        got = model(tokens, positions, mask)
    assert_fp32_close(got, F.linear(hidden[0], embedding), reduction=model.config.hidden_size)
    assert "output_layer" not in " ".join(model.state_dict())  # no checkpoint keys of its own


# Quantized checkpoints -----------------------------------------------------------------------------------


def convert(source_folder: Path, folder: Path, target_tp: int, bits: int | None = None, **flags) -> Path:
    """What tools/convert_tp.py does with ConversionPlan (each target rank's slices, then its entries)."""
    source = ShardedCheckpoint(source_folder)
    plan = ConversionPlan(source, read_metadata(source_folder), bits, **flags)

    def rank_state_dict(rank: int) -> dict[str, torch.Tensor]:
        shard = {}
        for key in source.keys:
            shard.update(plan.entries(key, source.read(key, rank, target_tp)))
        return {k: v.clone() for k, v in shard.items()}

    return write_checkpoint(
        folder, rank_state_dict, get_preset("sat-tiny"), target_tp, extra_metadata=plan.metadata(target_tp)
    )


def write_quantized(
    folder: Path, spec: QuantizationSpec, tensor_parallel_size: int, metadata: bool = True
) -> Path:
    """sat_tiny quantized per target rank, as tools/convert_tp.py --quantization-bit-width writes it."""
    flags = dict(scheme=spec.scheme, group_size=spec.group_size)
    folder = convert(SAT_TINY / "ckpt", folder, tensor_parallel_size, spec.bits, **flags)
    if not metadata:  # as the original's quantized checkpoints: no model_config.json at all
        (folder / "model_config.json").unlink()
    return folder


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantized_checkpoint_loads_without_flags_to_the_quantize_while_loading_model(
    spec, reference, tmp_path
):
    folder = write_quantized(tmp_path / "q", spec, 1)
    shard = torch.load(folder / "release" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    qkv = shard["transformer.layers.0.attention.query_key_value.weight"]
    assert qkv.dtype == torch.int8 and qkv.shape == (192, 64 * spec.bits // 8)
    loaded = load_sat_tiny([checkpoint_transform(folder)], folder)
    on_the_fly = load_sat_tiny([quantization_transform(spec.bits, spec.scheme, spec.group_size)])
    for got, expected in zip(loaded.state_dict().values(), on_the_fly.state_dict().values(), strict=True):
        assert torch.equal(got, expected)
    torch.testing.assert_close(
        forward(loaded, reference)[0], forward(on_the_fly, reference)[0], atol=0, rtol=0
    )


@pytest.mark.parametrize("spec", TP_SPECS, ids=str)
def test_tp2_quantized_checkpoint_loads_at_tp1_with_each_shards_scales(spec, tmp_path):
    folder = write_quantized(tmp_path / "q2", spec, 2)
    shards = [
        torch.load(folder / "release" / f"mp_rank_0{r}_model_states.pt", weights_only=True)["module"]
        for r in (0, 1)
    ]
    model = load_sat_tiny([checkpoint_transform(folder)], folder)
    for name in ("attention.dense", "mlp.dense_4h_to_h"):  # row parallel: input columns split
        key = f"transformer.layers.1.{name}.weight"
        per_shard = [dequantize(s[key], s[key + "_scale"], spec.bits) for s in shards]
        module = model.transformer.layers[1].get_submodule(name)
        assert torch.equal(
            dequantize(module.weight, module.weight_scale, spec.bits), torch.cat(per_shard, dim=1)
        )


@pytest.mark.parametrize("spec", TP_SPECS, ids=str)
def test_resharding_a_quantized_state_dict_is_exact(spec):
    model = load_sat_tiny([quantization_transform(spec.bits, spec.scheme, spec.group_size)])
    state = model.state_dict()
    for parts in (2, 4):
        merged = {k: merge_tensors(k, split_tensor(k, v, parts)) for k, v in state.items()}
        for key, tensor in state.items():
            if not key.endswith("_scale"):
                assert torch.equal(merged[key], tensor), key
        for index in (0, 1):
            for name in LINEARS:
                key = f"transformer.layers.{index}.{name}.weight"
                expected = dequantize(state[key], state[key + "_scale"], spec.bits)
                assert torch.equal(dequantize(merged[key], merged[key + "_scale"], spec.bits), expected)
    # A per-row scale split across 2 row-parallel shards: each shard keeps the row's scale.
    scale = state["transformer.layers.0.attention.dense.weight_scale"]
    shards = split_tensor("transformer.layers.0.attention.dense.weight_scale", scale, 2)
    assert all(torch.equal(s, scale) for s in shards) == (spec.scheme == "row")


def test_quantized_checkpoint_saved_from_a_model_loads_at_tp1(reference, tmp_path):
    spec = QuantizationSpec(4)
    model = load_sat_tiny([quantization_transform(4)])
    folder = tmp_path / "saved"
    write_checkpoint(
        folder,
        lambda rank: model.state_dict(),
        get_preset("sat-tiny"),
        extra_metadata=quantization_metadata(spec, 1),
    )
    loaded = load_sat_tiny([checkpoint_transform(folder)], folder)
    torch.testing.assert_close(forward(loaded, reference)[1], forward(model, reference)[1], atol=0, rtol=0)


def test_the_originals_confusions_are_one_line_errors(tmp_path):
    no_metadata = write_quantized(tmp_path / "original_int4", QuantizationSpec(4), 1, metadata=False)
    with pytest.raises(CheckpointError, match="pass --quantization-bit-width 4 or 8 and --from-quantized"):
        checkpoint_transform(no_metadata)  # #38 / #185: an INT4 checkpoint loaded as fp16
    with pytest.raises(CheckpointError, match="it is an INT4 checkpoint, pass --quantization-bit-width 4"):
        load_sat_tiny([checkpoint_transform(no_metadata, 8, from_quantized_checkpoint=True)], no_metadata)
    model = load_sat_tiny([checkpoint_transform(no_metadata, 4, from_quantized_checkpoint=True)], no_metadata)
    assert model.transformer.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.int8
    with pytest.raises(CheckpointError, match="not quantized: drop --from-quantized-checkpoint"):
        checkpoint_transform(SAT_TINY / "ckpt", 4, from_quantized_checkpoint=True)  # #62
    with_metadata = write_quantized(tmp_path / "int8", QuantizationSpec(8), 1)
    with pytest.raises(CheckpointError, match="is an INT8 checkpoint: drop --quantization-bit-width 4"):
        checkpoint_transform(with_metadata, 4)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint_tensor(
            "transformer.layers.0.attention.dense.weight",
            torch.zeros(4, 4, dtype=torch.int8),
            QuantizationSpec(8),
        )


def test_fp16_checkpoint_quantizes_while_loading_from_its_fp16_values(tmp_path):
    half = {k: v.half() for k, v in load_sat_tiny().state_dict().items()}
    folder = save_checkpoint(half, tmp_path / "fp16", get_preset("sat-tiny"))
    model = load_sat_tiny([quantization_transform(8)], folder)
    layer = model.transformer.layers[0].attention.query_key_value
    expected, expected_scale = original_quantize(
        half["transformer.layers.0.attention.query_key_value.weight"], 8
    )
    assert torch.equal(layer.weight, expected) and torch.equal(layer.weight_scale, expected_scale)


def test_converting_a_quantized_checkpoint_reshards_it_exactly_and_keeps_its_metadata(reference, tmp_path):
    spec = QuantizationSpec(4, "group", 8)
    tp1 = write_quantized(tmp_path / "int4", spec, 1)
    tp4 = convert(tp1, tmp_path / "int4-tp4", 4)  # no flag needed: the input records its quantization
    back = convert(tp4, tmp_path / "int4-tp4-tp2", 2, bits=4)
    assert read_metadata(back)["quantization"]["scheme"] == "group"
    expected = load_sat_tiny([checkpoint_transform(tp1)], tp1)
    for folder in (tp4, back):
        model = load_sat_tiny([checkpoint_transform(folder)], folder)
        for got, want in zip(model.modules(), expected.modules(), strict=True):
            if isinstance(got, QuantizedLinear):
                assert torch.equal(
                    dequantize(got.weight, got.weight_scale, 4), dequantize(want.weight, want.weight_scale, 4)
                )
    with pytest.raises(CheckpointError, match="cannot be converted to INT8"):
        convert(tp1, tmp_path / "int8", 1, bits=8)


def _tp_worker(rank: int, folder: str, out: Path) -> None:
    from glm import distributed, tensor_parallel

    quantization.layers.make_kernel = reference_kernel
    reference = torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)
    distributed.initialize()
    transforms = [tensor_parallel.transform(), checkpoint_transform(folder)]
    model, _ = load_model(folder, transforms=transforms)
    torch.save(forward(model, reference), out / f"rank{rank}.pt")
    distributed.shutdown()


def test_int4_checkpoint_loads_at_tp2_without_flags(reference, tmp_path, monkeypatch):
    from ranks import run_ranks

    folder = write_quantized(tmp_path / "int4", QuantizationSpec(4), 1)
    run_ranks(_tp_worker, 2, str(folder), tmp_path, timeout=240)
    monkeypatch.setattr(quantization.layers, "make_kernel", reference_kernel)
    expected = forward(load_sat_tiny([checkpoint_transform(folder)], folder), reference)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for g, e in zip(got, expected, strict=True):
            assert_model_close(g, e, get_preset("sat-tiny"))


# CUDA (skipped without a GPU) ----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", [*SPECS, QuantizationSpec(4, "group", 128)], ids=str)
@pytest.mark.parametrize("rows", [1, 64])
def test_cuda_kernel_equals_the_dequantised_reference(spec, rows):
    from quantization.cuda import CUDAKernel

    weight, scale = quantized(spec, 256, 1024)
    weight, scale = weight.cuda(), scale.cuda()
    x = torch.randn(rows, 1024, device="cuda").half()
    got = CUDAKernel(spec.bits)(x, weight, scale)
    expected = reference_linear(x.float(), weight, scale, spec.bits)
    assert relative_error(got, expected) < 1e-2  # fp16 / bf16 activations and outputs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_sat_tiny_on_cuda_is_close_to_the_cpu_model(reference):
    transform = quantization_transform(4, "group", 32)
    cpu = load_sat_tiny([transform])
    model, _ = load_model(
        SAT_TINY / "ckpt", config=get_preset("sat-tiny"), transforms=[transform], device="cuda"
    )
    tokens, positions, mask = (reference[k].cuda() for k in ("tokens", "position_ids", "attention_mask"))
    with torch.no_grad():
        got = model(tokens, positions, mask).float().cpu()
    expected = forward(cpu, reference)[0]
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
