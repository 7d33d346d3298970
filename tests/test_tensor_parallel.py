"""Tensor parallelism across real gloo processes against the single-process model and the original."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from ranks import run_ranks
from tolerance import assert_model_close

from glm import distributed, tensor_parallel
from glm.checkpoint import CheckpointError, save_checkpoint
from glm.config import get_preset
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.loading import load_model
from glm.model import GLM, init_random_weights

# The sizes of every model compared here (the eight-head variant differs in its head count only).
CONFIG = get_preset("sat-tiny")

SAT_TINY = Path(__file__).parent / "data" / "sat_tiny"
EOP, SOP, MASK = 995, 994, 990
# The reference context ([gMASK]) and a [MASK] query, generated as one batch.
CONTEXTS = [[11, 27, 305, 42, 7, 613, 991, SOP], [5, 6, 7, MASK, 9, 10, 12, SOP]]
MASK_POSITIONS = [None, 3]


def outputs(model: GLM, reference: dict, full: bool = True) -> dict:
    """What is compared between tensor-parallel sizes, computed the same way at every size (`full=False`
    leaves out the incremental logits, the stochastic beam search and repeated sampling: 8 ranks on 2 cores
    are slow)."""
    tokens, positions, mask = reference["tokens"], reference["position_ids"], reference["attention_mask"]
    result = {}
    with torch.no_grad():
        result["logits"] = model(tokens, positions, mask)
        cache = model.new_cache(1, 12)
        prefill = model(tokens[:, :7], positions[:, :7], mask[:, :, :7, :7], cache)
        steps = [model(tokens[:, i : i + 1], positions[:, i : i + 1], mask[:, :, i : i + 1, : i + 1], cache)
                 for i in range(7, 12 if full else 7)]  # fmt: skip
        result["incremental"] = torch.cat([prefill[:, -1:], *steps], dim=1)
        result["cache_k"], result["cache_v"] = torch.stack(cache.k), torch.stack(cache.v)  # local heads
    greedy = BaseStrategy(2, top_k=1, end_tokens=[EOP])
    result["greedy"] = generate(model, CONTEXTS, greedy, 6, MASK_POSITIONS)
    beam = BeamSearchStrategy(
        2, 4, consider_end=True, end_tokens=[EOP], no_repeat_ngram_size=2, deterministic=True
    )
    result["beam"] = generate(model, CONTEXTS, beam, 6, MASK_POSITIONS)
    torch.manual_seed(1234)
    sampling = BaseStrategy(2, top_k=0, top_p=0.9, temperature=1.3, end_tokens=[EOP])
    result["sampled"] = [
        generate(model, CONTEXTS, sampling, 8, MASK_POSITIONS) for _ in range(3 if full else 1)
    ]
    if full:
        stochastic_beam = BeamSearchStrategy(2, 3, consider_end=True, end_tokens=[EOP])
        result["sampled_beam"] = generate(model, CONTEXTS, stochastic_beam, 6, MASK_POSITIONS)
    return result


def _worker(rank: int, jobs: list[tuple[str, str | None]], out: Path, full: bool) -> None:
    reference = torch.load(SAT_TINY / "reference_outputs.pt", weights_only=True)
    parallel = distributed.initialize()
    results = []
    for folder, preset in jobs:
        config = get_preset(preset) if preset else None
        model, _ = load_model(folder, config=config, transforms=[tensor_parallel.transform()])
        results.append(outputs(model, reference, full))
    torch.save({"tensor_rank": parallel.tensor_rank, "results": results}, out / f"rank{rank}.pt")
    distributed.shutdown()


def eight_head_config():
    return dataclasses.replace(get_preset("sat-tiny"), num_attention_heads=8)


@pytest.fixture(scope="module")
def eight_heads(tmp_path_factory) -> tuple[Path, GLM]:
    """A random 8-head model saved with 4 tensor-parallel shards, and the same model in this process."""
    config = eight_head_config()
    with torch.device("meta"):
        model = GLM(config)
    model = model.to_empty(device="cpu")
    init_random_weights(model, seed=3, std=0.08)
    model.compute_device = torch.device("cpu")
    folder = tmp_path_factory.mktemp("tp") / "eight_heads_tp4"
    save_checkpoint(model.state_dict(), folder, config, tensor_parallel_size=4)
    return folder, model.eval()


def run_and_collect(
    world_size: int, jobs: list[tuple[Path, str | None]], tmp_path: Path, full: bool = True
) -> list[dict]:
    run_ranks(_worker, world_size, [(str(f), p) for f, p in jobs], tmp_path, full, timeout=240)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def assert_same_as_single_process(expected: dict, ranks: list[dict], job: int, heads: int) -> None:
    size = len(ranks)
    local = heads // size
    for rank in ranks:
        got = rank["results"][job]
        assert_model_close(got["logits"], expected["logits"], CONFIG)
        assert_model_close(got["incremental"], expected["incremental"], CONFIG)
        for key in ("greedy", "beam", "sampled", "sampled_beam"):
            assert got.get(key) == expected.get(key), key
        # The cache holds this rank's heads only: slice r of the single-process cache's heads.
        r = rank["tensor_rank"]
        assert got["cache_k"].shape[2] == local
        for name in ("cache_k", "cache_v"):
            heads_of_rank = expected[name][:, :, r * local : (r + 1) * local]
            assert_model_close(got[name], heads_of_rank, CONFIG)


def test_tp2_matches_one_process_on_sat_tiny_and_loads_a_tp4_checkpoint(
    sat_tiny, reference, eight_heads, tmp_path
):
    folder, full = eight_heads
    ranks = run_and_collect(2, [(SAT_TINY / "ckpt", "sat-tiny"), (folder, None)], tmp_path)
    expected = outputs(sat_tiny, reference)
    # The single-process model itself reproduces the original implementation.
    assert_model_close(expected["logits"], reference["logits_full"], CONFIG)
    assert_same_as_single_process(expected, ranks, 0, heads=4)
    assert_same_as_single_process(outputs(full, reference), ranks, 1, heads=8)
    assert ranks[0]["results"][0]["greedy"][0][0] == reference["greedy_tokens"][0].tolist()


def test_tp4_matches_one_process_on_sat_tiny(sat_tiny, reference, tmp_path):
    ranks = run_and_collect(4, [(SAT_TINY / "ckpt", "sat-tiny")], tmp_path)
    assert_same_as_single_process(outputs(sat_tiny, reference), ranks, 0, heads=4)
    # The original's KV cache (per token [K | V], heads in order) is the ranks' caches side by side.
    k = torch.cat([r["results"][0]["cache_k"] for r in ranks], dim=2)[:, :, :, :12]
    v = torch.cat([r["results"][0]["cache_v"] for r in ranks], dim=2)[:, :, :, :12]
    flat = [x.permute(0, 1, 3, 2, 4).flatten(3) for x in (k, v)]
    assert_model_close(torch.cat(flat, dim=-1), reference["mem_kv_full"], CONFIG)


def test_tp8_on_eight_heads_from_a_tp4_checkpoint(reference, eight_heads, tmp_path):
    folder, full = eight_heads
    ranks = run_and_collect(8, [(folder, None)], tmp_path, full=False)
    assert_same_as_single_process(outputs(full, reference, full=False), ranks, 0, heads=8)


def _meta_model(config) -> GLM:
    with torch.device("meta"):
        return GLM(config)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (3, "tensor-parallel size 3 must divide the 4 attention heads and the 1000 vocabulary rows"),
        (8, "tensor-parallel size 8 must divide the 4 attention heads"),
    ],
)
def test_a_size_that_does_not_divide_the_heads_is_an_error_before_reading(size, message):
    with pytest.raises(CheckpointError, match=message):
        tensor_parallel.apply_tensor_parallel(_meta_model(get_preset("sat-tiny")), 0, size)


def test_a_size_that_splits_a_geglu_half_is_an_error():
    config = dataclasses.replace(get_preset("sat-tiny"), inner_hidden_size=162)
    with pytest.raises(CheckpointError, match="must divide the GeGLU inner size 162"):
        tensor_parallel.apply_tensor_parallel(_meta_model(config), 0, 4)


def test_wrong_size_fails_before_any_weight_is_read(monkeypatch):
    from glm import checkpoint

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(checkpoint.ShardedCheckpoint, "read", no_reads)
    parallel = distributed.Parallel(rank=1, world_size=3, tensor_parallel_size=3)
    with pytest.raises(CheckpointError, match="tensor-parallel size 3"):
        load_model(
            SAT_TINY / "ckpt", config=get_preset("sat-tiny"), transforms=[tensor_parallel.transform(parallel)]
        )


def test_world_size_one_leaves_the_model_unchanged():
    model = _meta_model(get_preset("sat-tiny"))
    before = {k: v.shape for k, v in model.state_dict().items()}
    assert tensor_parallel.apply_tensor_parallel(model, 0, 1) is model
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    assert not hasattr(model, "shard")


def test_shards_have_the_original_per_rank_shapes():
    """The TP = 8 shapes of GLM-130B's released checkpoint (reference section 6.1), on the meta device."""
    model = tensor_parallel.apply_tensor_parallel(_meta_model(get_preset("glm-130b")), 3, 8)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layer = "transformer.layers.0."
    assert shapes["transformer.word_embeddings.weight"] == (18816, 12288)
    assert shapes[layer + "attention.query_key_value.weight"] == (4608, 12288)
    assert shapes[layer + "attention.query_key_value.bias"] == (4608,)
    assert shapes[layer + "attention.dense.weight"] == (12288, 1536)
    assert shapes[layer + "attention.dense.bias"] == (12288,)
    assert shapes[layer + "mlp.dense_h_to_4h.weight"] == (8192, 12288)
    assert shapes[layer + "mlp.dense_4h_to_h.weight"] == (12288, 4096)
    assert shapes[layer + "mlp.dense_4h_to_h.bias"] == (12288,)
    assert model.transformer.layers[0].attention.num_heads == 12
    assert model.transformer.word_embeddings.start == 3 * 18816
    assert model.output_layer.weight is model.transformer.word_embeddings.weight
