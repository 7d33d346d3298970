"""The load pipeline: slices from any source TP size, load_weight hooks, memory mapping, peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm.api import DEFAULT_MODEL
from glm.checkpoint import CheckpointError, ShardedCheckpoint, save_checkpoint
from glm.loading import check_device_dtype, load_model
from glm.model import GLM, Linear, init_random_weights
from glm.sharding import Split, merge_state_dicts, split_rule, split_state_dict, split_tensor
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def full_state_dict() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = GLM(tiny_config())
    return init_random_weights(model.to_empty(device="cpu"), seed=3).state_dict()


@pytest.mark.parametrize("source_tp", [1, 2, 4])
@pytest.mark.parametrize("target_tp", [1, 2, 4])
def test_read_gives_the_split_of_the_merged_tensor(full_state_dict, tmp_path, source_tp, target_tp):
    folder = save_checkpoint(full_state_dict, tmp_path / "ckpt", tiny_config(), None, source_tp)
    checkpoint = ShardedCheckpoint(folder)
    assert checkpoint.tensor_parallel_size == source_tp
    assert checkpoint.keys == list(full_state_dict)
    # The second implementation: merge every source shard, then split (what the loader used to do).
    merged = merge_state_dicts(split_state_dict(full_state_dict, source_tp))
    for key in checkpoint.keys:
        assert checkpoint.shape(key) == full_state_dict[key].shape
        for rank in range(target_tp):
            expected = split_tensor(key, merged[key], target_tp)[rank]
            torch.testing.assert_close(checkpoint.read(key, rank, target_tp), expected, atol=0, rtol=0)


def _mapped_files(pointer: int) -> list[str]:
    """The files mapped at `pointer` in this process (/proc/self/maps)."""
    files = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= pointer < end and len(fields) == 6:
            files.append(fields[5])
    return files


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_checkpoint_in_the_target_dtype_stays_memory_mapped():
    model, _ = load_model(DEFAULT_MODEL, dtype="float16")  # stored in fp16
    shard = str(next((DEFAULT_MODEL / "release").glob("mp_rank_00_model_states.pt")).resolve())
    for name, param in model.named_parameters():
        assert _mapped_files(param.data_ptr()) == [shard], name
    model32, _ = load_model(DEFAULT_MODEL, dtype="float32")  # a cast: copies, in anonymous memory
    for name, param in model32.named_parameters():
        mapped = shard in _mapped_files(param.data_ptr())
        # except the matrices kept 16-bit for the native fp32 matmul (glm.loading.storage_dtype)
        assert mapped == (param.dtype == torch.float16), name


def test_16bit_matrices_of_an_fp32_model_give_the_fp32_model_logits(monkeypatch):
    from glm import cpu_matmul

    ids = torch.tensor([[5, 17, 300, 42, 9, 11]])
    positions = torch.arange(6)[None]
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mixed, _ = load_model(DEFAULT_MODEL, dtype="float32")
    monkeypatch.setattr(cpu_matmul, "native", lambda: None)  # no native kernel: every weight widened at load
    wide, _ = load_model(DEFAULT_MODEL, dtype="float32")
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    if {p.dtype for p in mixed.parameters()} == {torch.float32}:
        pytest.skip("no native kernel on this machine: nothing is kept 16-bit")
    qkv = mixed.transformer.layers[0].attention.query_key_value
    assert qkv.weight.dtype == torch.float16 and qkv.bias.dtype == torch.float32
    assert mixed.transformer.final_layernorm.weight.dtype == torch.float32
    with torch.no_grad():
        for rows in (ids[:, :1], ids):  # the native path (one row) and F.linear on the widened weight
            n = rows.shape[1]
            expected = wide(rows, positions[:, :n], mask[..., :n, :n])
            torch.testing.assert_close(mixed(rows, positions[:, :n], mask[..., :n, :n]), expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_of_a_casting_load_is_the_model_plus_one_tensor(monkeypatch):
    from bench.load_memory import measure

    monkeypatch.setenv("GLM_NATIVE", "0")  # the child casts every matrix too (none kept 16-bit)
    result = measure(DEFAULT_MODEL, "float32")  # fp16 on disk -> fp32: every tensor is copied
    checkpoint = ShardedCheckpoint(DEFAULT_MODEL)
    stored = sum(checkpoint.shape(k).numel() * checkpoint.dtype(k).itemsize for k in checkpoint.keys)
    assert result["model_bytes"] == 2 * stored
    assert result["peak_above_start"] <= result["goal"]  # model + largest tensor + 10 %


def test_the_output_layer_is_tied_and_has_no_keys():
    model, _ = load_model(DEFAULT_MODEL)
    assert model.output_layer.weight is model.transformer.word_embeddings.weight
    assert not any(key.startswith("output_layer") for key in model.state_dict())
    x = torch.randn(2, 3, model.config.hidden_size)
    torch.testing.assert_close(model.output_layer(x), x @ model.transformer.word_embeddings.weight.float().T)


def test_a_reduced_linear_adds_its_bias_once():
    layer = Linear(3, 2)
    x = torch.randn(4, 3)
    layer.reduce = lambda partial: 2 * partial  # as if two ranks held the same partial product
    torch.testing.assert_close(layer(x), 2 * (x @ layer.weight.T) + layer.bias)
    layer.reduce = None
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


class RecordingLinear(Linear):
    """A stand-in for a quantized layer: receives its tensors through load_weight."""

    def load_weight(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.received.append((name, tensor.shape, tensor.dtype))
        setattr(self, name, nn.Parameter(tensor.to(dtype) * 0, requires_grad=False))

    def finish_loading(self) -> None:
        self.finished = True


def test_transforms_run_on_meta_and_modules_load_their_own_tensors(full_state_dict, tmp_path):
    folder = save_checkpoint(full_state_dict, tmp_path / "ckpt", tiny_config(), None, 2)
    seen_devices = []

    def swap_first_qkv(model: GLM) -> GLM:
        attention = model.transformer.layers[0].attention
        seen_devices.append(attention.query_key_value.weight.device.type)
        swapped = RecordingLinear(*reversed(attention.query_key_value.weight.shape))
        swapped.received = []
        attention.query_key_value = swapped
        return model

    model, _ = load_model(folder, tiny_config(), transforms=[swap_first_qkv])
    layer = model.transformer.layers[0].attention.query_key_value
    assert seen_devices == ["meta"]
    h = tiny_config().hidden_size
    assert layer.received == [("weight", (3 * h, h), torch.float32), ("bias", (3 * h,), torch.float32)]
    assert layer.finished
    assert torch.count_nonzero(layer.weight) == 0  # what the hook stored, not the checkpoint's tensor
    other = model.transformer.layers[1].attention.query_key_value.weight
    torch.testing.assert_close(
        other, full_state_dict["transformer.layers.1.attention.query_key_value.weight"]
    )


def test_a_tensor_no_key_fills_is_an_error(full_state_dict, tmp_path):
    folder = save_checkpoint(full_state_dict, tmp_path / "ckpt", tiny_config(), None, 1)

    def add_parameter(model: GLM) -> GLM:
        model.transformer.final_layernorm.extra = nn.Parameter(torch.empty(3, device="meta"))
        return model

    with pytest.raises(CheckpointError, match=r"no weights for transformer\.final_layernorm\.extra"):
        load_model(folder, tiny_config(), transforms=[add_parameter])


def test_replicated_keys_that_differ_across_shards_are_an_error(full_state_dict, tmp_path):
    key = "transformer.final_layernorm.weight"
    assert split_rule(key) is Split.REPLICATED
    folder = save_checkpoint(full_state_dict, tmp_path / "ckpt", tiny_config(), None, 2)
    path = folder / "release" / "mp_rank_01_model_states.pt"
    data = torch.load(path, weights_only=True)
    data["module"][key] = torch.ones(5)
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="replicated tensor has shape"):
        load_model(folder)


@pytest.mark.parametrize(
    ("capability", "dtype", "refused"),
    [
        ((7, 0), torch.bfloat16, True),  # V100
        ((7, 5), torch.bfloat16, True),  # RTX 2080 Ti, T4
        ((7, 0), torch.float16, False),
        ((8, 0), torch.bfloat16, False),
        ((9, 0), torch.bfloat16, False),
    ],
)
def test_bfloat16_is_refused_on_a_gpu_below_sm_80(monkeypatch, capability, dtype, refused):
    asked = []
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability
    )
    sm = f"sm_{capability[0]}{capability[1]}"
    if refused:
        message = rf"^bfloat16 needs an sm_80 or newer GPU .*; cuda:1 is {sm}: use --dtype float16$"
        with pytest.raises(ValueError, match=message):
            check_device_dtype(dtype, torch.device("cuda", 1))
        assert asked == [torch.device("cuda", 1)]
    else:
        check_device_dtype(dtype, torch.device("cuda", 1))
    check_device_dtype(torch.bfloat16, torch.device("cpu"))  # the CPU: bf16 as asked


def test_loading_bfloat16_on_a_v100_stops_before_reading_weights(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="sm_70: use --dtype float16"):
        load_model(DEFAULT_MODEL, dtype="bfloat16", device="cuda")
