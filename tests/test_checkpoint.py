"""The original checkpoint layout: tensor-parallel split rules, loading errors, the allow-list and saving."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SAT_TINY, tiny_config
from torch import Tensor, nn

from glm.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from glm.config import GLMConfig, get_preset
from glm.loading import load_model
from glm.model import GLM, SelfAttention, init_random_weights, rotary_tables
from glm.sharding import merge_state_dicts, split_state_dict, split_tensor

SAT_CKPT = SAT_TINY / "ckpt"
L0 = "transformer.layers.0."


def arange(*shape: int) -> Tensor:
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)


def random_model(config: GLMConfig, seed: int = 0) -> GLM:
    """A random model with nonzero biases too (init_random_weights zeroes them), so biases are tested."""
    model = init_random_weights(GLM(config), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def assert_same_weights(model: GLM, expected: GLM) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.state_dict().keys()
    for key, tensor in expected.state_dict().items():
        assert torch.equal(actual[key], tensor), key


def shard_file(folder, rank: int, tag: str = "release"):
    return folder / tag / f"mp_rank_{rank:02d}_model_states.pt"


def rewrite_shard(folder, rank: int, edit) -> None:
    """Replace rank's file contents by edit(contents)."""
    path = shard_file(folder, rank)
    torch.save(edit(torch.load(path, weights_only=True)), path)


@pytest.fixture(scope="module")
def model() -> GLM:
    return random_model(tiny_config())


@pytest.fixture
def ckpt(model, tmp_path):
    """A TP=2 checkpoint of `model`."""
    return save_checkpoint(model.state_dict(), tmp_path / "ckpt", model.config, tensor_parallel_size=2)


# --- 1. split rules, written out by hand ---------------------------------------------------------------


def rows(x: Tensor, r: int, n: int) -> Tensor:
    k = x.shape[0] // n
    return x[r * k : (r + 1) * k]


def columns(x: Tensor, r: int, n: int) -> Tensor:
    k = x.shape[1] // n
    return x[:, r * k : (r + 1) * k]


def glu_rows(x: Tensor, r: int, n: int) -> Tensor:
    half = x.shape[0] // 2  # [X1 (value); X2 (gate)]: rank r holds its slice of each half
    return torch.cat([rows(x[:half], r, n), rows(x[half:], r, n)])


def replicated(x: Tensor, r: int, n: int) -> Tensor:
    return x


# hidden 8, 4 heads of 2, inner 8, vocab 12: every split below divides evenly for TP 2 and 4.
HAND_RULES = [
    ("transformer.word_embeddings.weight", (12, 8), rows),
    (L0 + "input_layernorm.weight", (8,), replicated),
    (L0 + "input_layernorm.bias", (8,), replicated),
    (L0 + "attention.query_key_value.weight", (24, 8), rows),
    (L0 + "attention.query_key_value.bias", (24,), rows),
    (L0 + "attention.dense.weight", (8, 8), columns),
    (L0 + "attention.dense.bias", (8,), replicated),
    (L0 + "post_attention_layernorm.weight", (8,), replicated),
    (L0 + "post_attention_layernorm.bias", (8,), replicated),
    (L0 + "mlp.dense_h_to_4h.weight", (16, 8), glu_rows),
    (L0 + "mlp.dense_h_to_4h.bias", (16,), glu_rows),
    (L0 + "mlp.dense_4h_to_h.weight", (8, 8), columns),
    (L0 + "mlp.dense_4h_to_h.bias", (8,), replicated),
    ("transformer.final_layernorm.weight", (8,), replicated),
    ("transformer.final_layernorm.bias", (8,), replicated),
]


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize(("key", "shape", "rule"), HAND_RULES, ids=[k for k, _, _ in HAND_RULES])
def test_split_rule_by_hand(key, shape, rule, parts):
    x = arange(*shape)
    shards = split_tensor(key, x, parts)
    assert len(shards) == parts
    for r, shard in enumerate(shards):
        assert torch.equal(shard, rule(x, r, parts)), f"rank {r}"


def test_glu_split_literal_values():
    # dense_h_to_4h bias with inner 6: value half 0..5, gate half 6..11.
    shards = split_tensor(L0 + "mlp.dense_h_to_4h.bias", arange(12), 2)
    assert [s.tolist() for s in shards] == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    # The weight: rank r holds cat(X1.chunk(2)[r], X2.chunk(2)[r]).
    x = arange(12, 3)
    x1, x2 = x[:6], x[6:]
    for r, shard in enumerate(split_tensor(L0 + "mlp.dense_h_to_4h.weight", x, 2)):
        assert torch.equal(shard, torch.cat([x1.chunk(2)[r], x2.chunk(2)[r]]))


def test_qkv_split_gives_whole_heads():
    heads, head_dim, hidden = 4, 2, 8
    x = arange(3 * hidden, hidden)
    per_head = x.view(heads, 3 * head_dim, hidden)  # per head [q|k|v]
    for r, shard in enumerate(split_tensor(L0 + "attention.query_key_value.weight", x, 2)):
        assert torch.equal(shard.view(heads // 2, 3 * head_dim, hidden), per_head[2 * r : 2 * r + 2])


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_merge_inverts_split_for_every_key(parts):
    config = tiny_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GLM(config).state_dict().items()}
    full = {k: arange(*shape) + i * 10_000 for i, (k, shape) in enumerate(shapes.items())}
    shards = split_state_dict(full, parts)
    h, inner = config.hidden_size, config.inner_hidden_size
    local = shards[-1]
    assert local["transformer.word_embeddings.weight"].shape == (config.vocab_size // parts, h)
    assert local[L0 + "attention.query_key_value.weight"].shape == (3 * h // parts, h)
    assert local[L0 + "attention.dense.weight"].shape == (h, h // parts)
    assert local[L0 + "mlp.dense_h_to_4h.weight"].shape == (2 * inner // parts, h)
    assert local[L0 + "mlp.dense_4h_to_h.weight"].shape == (h, inner // parts)
    for shard in shards:  # each piece owns its storage, so saving a shard does not save the full tensor
        for key, t in shard.items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key
    merged = merge_state_dicts(shards)
    assert merged.keys() == full.keys()
    for key, tensor in full.items():
        assert torch.equal(merged[key], tensor), key


# --- 2. a TP=2 computation from the split weights equals the full one ----------------------------------


def test_tp2_mlp_by_hand_matches_full_model(model):
    shards = split_state_dict(model.state_dict(), 2)
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    mlp = L0 + "mlp."

    def tp2_mlp(shards):
        out = 0
        for shard in shards:  # GeGLU on each rank's local output, then its slice of the row-parallel matmul
            local = F.linear(x, shard[mlp + "dense_h_to_4h.weight"], shard[mlp + "dense_h_to_4h.bias"])
            value, gate = local.chunk(2, dim=-1)
            out = out + F.linear(value * F.gelu(gate), shard[mlp + "dense_4h_to_h.weight"])
        return out + shards[0][mlp + "dense_4h_to_h.bias"]  # the replicated bias, added once

    with torch.no_grad():
        expected = model.transformer.layers[0].mlp(x)
    torch.testing.assert_close(tp2_mlp(shards), expected)

    # A plain contiguous split of dense_h_to_4h (ignoring the GeGLU halves) computes something else.
    naive = [dict(s) for s in shards]
    for key in (mlp + "dense_h_to_4h.weight", mlp + "dense_h_to_4h.bias"):
        for shard, piece in zip(naive, model.state_dict()[key].chunk(2), strict=True):
            shard[key] = piece
    assert not torch.allclose(tp2_mlp(naive), expected, atol=1e-3)


def test_tp2_attention_from_split_heads_matches_full_model(model):
    config = model.config
    h, s = config.hidden_size, 6
    shards = split_state_dict(model.state_dict(), 2)
    x = torch.randn(1, s, h, generator=torch.Generator().manual_seed(2))
    cos, sin = rotary_tables(torch.arange(s)[None], config.head_dim, config.rotary_base, False, x.dtype)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        expected = model.transformer.layers[0].attention(x, cos, sin, mask, None)
        out = 0
        for shard in shards:  # each rank runs its half of the heads; the row-parallel outputs are summed
            local = SelfAttention(config, layer_id=0)
            local.num_heads = config.num_attention_heads // 2
            local.query_key_value = nn.Linear(h, 3 * h // 2)
            local.dense = nn.Linear(h // 2, h, bias=False)
            attn = L0 + "attention."
            local.load_state_dict(
                {
                    "query_key_value.weight": shard[attn + "query_key_value.weight"],
                    "query_key_value.bias": shard[attn + "query_key_value.bias"],
                    "dense.weight": shard[attn + "dense.weight"],
                }
            )
            out = out + local(x, cos, sin, mask, None)
        out = out + shards[0][attn + "dense.bias"]
    torch.testing.assert_close(out, expected)


# --- 3. loading errors ---------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    for config in (tiny_config(), None):
        with pytest.raises(CheckpointError, match="does not exist") as e:
            load_model(missing, config=config)
        assert str(missing) in str(e.value)


def test_missing_latest(ckpt):
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(ckpt)
    assert str(ckpt / "latest") in str(e.value)


def test_latest_naming_a_missing_folder(ckpt):
    (ckpt / "latest").write_text("49300")
    with pytest.raises(CheckpointError, match="'49300'") as e:
        load_model(ckpt)
    assert str(ckpt / "49300") in str(e.value)


def test_latest_with_trailing_newline_loads(ckpt, model):
    (ckpt / "latest").write_text("release\n")
    loaded, _ = load_model(ckpt)
    assert_same_weights(loaded, model)


@pytest.mark.parametrize("rank", [0, 1])
def test_deleted_shard_names_the_rank(ckpt, rank):
    shard_file(ckpt, rank).unlink()
    with pytest.raises(CheckpointError, match=rf"rank\(s\) \[{rank}\]") as e:
        load_model(ckpt)
    assert str(ckpt / "release") in str(e.value)


DAMAGE = {
    "garbage": lambda data: b"\x80\x02not a checkpoint" * 50,
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_corrupt_shard_names_the_file(ckpt, damage):
    path = shard_file(ckpt, 1)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(CheckpointError, match="cannot read checkpoint shard") as e:
        load_model(ckpt)
    assert str(path) in str(e.value)


def test_shard_without_module(ckpt):
    rewrite_shard(ckpt, 0, lambda data: {"state_dict": data["module"]})
    with pytest.raises(CheckpointError, match="no 'module'") as e:
        load_model(ckpt)
    assert str(shard_file(ckpt, 0)) in str(e.value)


def test_unknown_key_is_named(ckpt):
    key = L0 + "attention.mystery.weight"
    rewrite_shard(ckpt, 1, lambda data: {"module": {**data["module"], key: torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="unexpected key") as e:
        load_model(ckpt)
    assert f"{shard_file(ckpt, 1)}: unexpected key '{key}'" in str(e.value)


def test_config_shape_mismatch_names_key_and_shapes():
    config = dataclasses.replace(get_preset("sat-tiny"), hidden_size=32)
    with pytest.raises(CheckpointError) as e:
        load_model(SAT_CKPT, config=config)
    message = str(e.value)
    assert "'transformer.word_embeddings.weight' has shape (1000, 64)" in message
    assert "needs (1000, 32)" in message and str(SAT_CKPT) in message


def test_different_keys_across_shards(ckpt):
    key = L0 + "input_layernorm.bias"
    rewrite_shard(ckpt, 1, lambda data: {"module": {k: v for k, v in data["module"].items() if k != key}})
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states\.pt holds other keys than") as e:
        load_model(ckpt)
    assert key in str(e.value)


# --- 4. the weights_only allow-list --------------------------------------------------------------------


def test_sat_extras_beside_the_weights_load(ckpt, model):
    extras = {"args": argparse.Namespace(model_parallel_size=2, fp16=True), "iteration": 49300}
    extras["rng_state"] = torch.get_rng_state()
    np = pytest.importorskip("numpy")
    extras["np_rng_state"] = np.random.get_state()
    for rank in (0, 1):
        rewrite_shard(ckpt, rank, lambda data: {**data, **extras})
    assert set(torch.load(shard_file(ckpt, 0), weights_only=False)) == {"module", *extras}
    loaded, _ = load_model(ckpt)
    assert_same_weights(loaded, model)


UNPICKLED = []


def _record(*args):
    UNPICKLED.append(args)


class Opaque:
    def __init__(self) -> None:
        self.value = 1


class Payload:
    """Unpickling this calls _record: what a hostile file would do with os.system."""

    def __reduce__(self):
        return (_record, ("payload ran",))


@pytest.mark.parametrize("obj", [Opaque(), Payload()], ids=["custom-class", "reduce-payload"])
def test_arbitrary_objects_are_refused(ckpt, obj):
    rewrite_shard(ckpt, 0, lambda data: {**data, "extra": obj})
    with pytest.raises(CheckpointError, match="cannot read checkpoint shard") as e:
        load_model(ckpt)
    assert str(shard_file(ckpt, 0)) in str(e.value)
    assert UNPICKLED == []
    if isinstance(obj, Payload):  # the payload is live: an unrestricted load would have run it
        torch.load(shard_file(ckpt, 0), weights_only=False)
        assert UNPICKLED == [("payload ran",)]
        UNPICKLED.clear()


# --- 5. legacy rotary buffers --------------------------------------------------------------------------


def test_sat_mixins_inv_freq_is_ignored():
    raw = torch.load(SAT_CKPT / "1" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert "mixins.rotary-embedding.rotary_emb.inv_freq" in raw
    state_dict, parts = load_state_dict(SAT_CKPT)
    assert parts == 1
    assert set(state_dict) == set(raw) - {"mixins.rotary-embedding.rotary_emb.inv_freq"}


def test_per_layer_inv_freq_is_ignored(ckpt, model):
    legacy = {f"transformer.layers.{i}.attention.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}
    for rank in (0, 1):
        rewrite_shard(ckpt, rank, lambda data: {"module": {**data["module"], **legacy}})
    loaded, _ = load_model(ckpt)
    assert_same_weights(loaded, model)


# --- 6. save_checkpoint --------------------------------------------------------------------------------


def test_save_writes_the_original_layout(model, tmp_path):
    config = model.config
    folder = save_checkpoint(model.state_dict(), tmp_path / "o", config, tensor_parallel_size=2, tag="49300")
    assert sorted(p.name for p in folder.iterdir()) == ["49300", "latest", "model_config.json"]
    assert (folder / "latest").read_text() == "49300"
    assert sorted(p.name for p in (folder / "49300").iterdir()) == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
    ]
    h = model.config.hidden_size
    for rank in (0, 1):
        data = torch.load(shard_file(folder, rank, "49300"), weights_only=True)
        assert list(data) == ["module"]
        assert data["module"][L0 + "attention.query_key_value.weight"].shape == (3 * h // 2, h)
    meta = json.loads((folder / "model_config.json").read_text())
    assert meta["model"] == model.config.to_dict()
    assert meta["tensor_parallel_size"] == 2
    assert meta["dtype"] == "float32"
    loaded, tokenizer = load_model(folder)  # config from model_config.json
    assert loaded.config == model.config and tokenizer is None
    assert_same_weights(loaded, model)


def test_save_refuses_to_overwrite(model, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists") as e:
        save_checkpoint(model.state_dict(), folder, model.config)
    assert str(folder) in str(e.value)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"
    save_checkpoint(model.state_dict(), folder, model.config, overwrite=True)
    assert not (folder / "keep.txt").exists() and (folder / "latest").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_refuses_tp_not_dividing_heads(model, tmp_path):
    with pytest.raises(CheckpointError, match="tensor-parallel size 3 must divide the 4 attention heads"):
        save_checkpoint(model.state_dict(), tmp_path / "out", model.config, tensor_parallel_size=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing(model, tmp_path, monkeypatch, existing):
    folder = tmp_path / "out"
    if existing:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    real_save = torch.save
    calls = []

    def save_once_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("No space left on device")
        real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_once_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model.state_dict(), folder, model.config, tensor_parallel_size=2, overwrite=existing)
    assert len(calls) == 2  # it did fail midway, after writing the first shard
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])  # no temporary folder
    if existing:
        assert [p.name for p in folder.iterdir()] == ["keep.txt"]


# --- 7. load_model options -----------------------------------------------------------------------------


def test_load_in_bfloat16(ckpt, model):
    loaded, _ = load_model(ckpt, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor.to(torch.bfloat16)), key


def test_unknown_dtype_names_the_choices(ckpt):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'") as e:
        load_model(ckpt, dtype="fp8")
    assert all(name in str(e.value) for name in ("float32", "bfloat16", "float16"))


def test_no_model_config_and_no_config_suggests_preset():
    with pytest.raises(CheckpointError, match="--config glm-130b") as e:
        load_model(SAT_CKPT)
    assert f"{SAT_CKPT} has no model_config.json" in str(e.value)


# --- 8. config -----------------------------------------------------------------------------------------


def test_config_unknown_key_suggests_nearest():
    values = {**tiny_config().to_dict(), "hiden_size": 32}
    with pytest.raises(ValueError) as e:
        GLMConfig.from_dict(values, source="my.json")
    assert str(e.value) == "my.json: unknown model config key 'hiden_size'; did you mean 'hidden_size'?"
