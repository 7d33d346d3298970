"""The model against the original implementation's outputs on the sat_tiny checkpoint."""

from __future__ import annotations

import torch
from tolerance import assert_model_close

from glm.checkpoint import save_checkpoint
from glm.config import get_preset
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.loading import load_model
from glm.model import GLM

EOP = 995  # sat_tiny's eop id


def forward_full(model: GLM, reference: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(reference["tokens"], reference["position_ids"], reference["attention_mask"])


def test_full_forward_matches_reference(sat_tiny, reference):
    logits = forward_full(sat_tiny, reference)
    assert logits.shape == reference["logits_full"].shape
    assert_model_close(logits, reference["logits_full"], sat_tiny.config)


def test_hidden_states_match_reference(sat_tiny, reference):
    outputs = []
    layers = sat_tiny.transformer.layers
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in layers]
    try:
        forward_full(sat_tiny, reference)
    finally:
        for hook in hooks:
            hook.remove()
    expected = reference["hidden_states_per_layer_sbh"].transpose(1, 2)  # [L, s, b, h] -> [L, b, s, h]
    assert_model_close(torch.stack(outputs), expected, sat_tiny.config)


def test_kv_cache_holds_reference_mem_kv(sat_tiny, reference):
    cache = sat_tiny.new_cache(1, 12)
    with torch.no_grad():
        sat_tiny(reference["tokens"], reference["position_ids"], reference["attention_mask"], cache)
    # mem_kv per token is [K after rotary | V], each heads in order: [L, b, s, 2*nh*hn]
    k = torch.stack(cache.k)[:, :, :, :12].permute(0, 1, 3, 2, 4).flatten(3)
    v = torch.stack(cache.v)[:, :, :, :12].permute(0, 1, 3, 2, 4).flatten(3)
    assert_model_close(torch.cat([k, v], dim=-1), reference["mem_kv_full"], sat_tiny.config)


def test_incremental_logits_match_reference(sat_tiny, reference):
    tokens, positions, mask = reference["tokens"], reference["position_ids"], reference["attention_mask"]
    cache = sat_tiny.new_cache(1, 12)
    steps = []
    with torch.no_grad():
        sat_tiny(tokens[:, :7], positions[:, :7], mask[:, :, :7, :7], cache)
        for i in range(7, 12):
            step = slice(i, i + 1)
            steps.append(sat_tiny(tokens[:, step], positions[:, step], mask[:, :, step, : i + 1], cache))
    assert_model_close(torch.cat(steps, dim=1), reference["logits_incremental"], sat_tiny.config)


def test_greedy_tokens_match_reference(sat_tiny, reference):
    context = reference["tokens"][0, : reference["context_length"]].tolist()
    strategy = BaseStrategy(1, top_k=1, end_tokens=[EOP])
    (beams,) = generate(sat_tiny, [context], strategy, max_gen_length=6)
    assert beams == [reference["greedy_tokens"][0].tolist()]


def test_sharded_checkpoints_load_to_the_same_logits(sat_tiny, reference, tmp_path):
    expected = forward_full(sat_tiny, reference)
    config = get_preset("sat-tiny")
    for parts in (2, 4):
        folder = tmp_path / f"tp{parts}"
        save_checkpoint(sat_tiny.state_dict(), folder, config, tensor_parallel_size=parts)
        shards = sorted((folder / "release").iterdir())
        assert len(shards) == parts
        shard = torch.load(shards[0], weights_only=True)["module"]
        qkv = shard["transformer.layers.0.attention.query_key_value.weight"]
        assert qkv.shape == (192 // parts, 64)
        model, _ = load_model(folder)  # the config comes from model_config.json
        torch.testing.assert_close(forward_full(model, reference), expected, atol=0, rtol=0)


def test_glm_130b_builds_on_meta_with_128_7b_parameters():
    config = get_preset("glm-130b")
    with torch.device("meta"):
        model = GLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == config.num_parameters() == 128_697_794_560
    layer = sum(p.numel() for p in model.transformer.layers[0].parameters())
    assert layer == 1_812_115_456


def test_half_precision_forward_is_close(sat_tiny, reference):
    expected = reference["logits_full"]
    # bf16 keeps 8 significant bits and fp16 11, so their errors differ by about 8x.
    for dtype, tolerance in ((torch.bfloat16, 0.25), (torch.float16, 0.05)):
        model = GLM(sat_tiny.config).to(dtype)
        model.load_state_dict(sat_tiny.state_dict())
        logits = forward_full(model, reference).float()
        assert (logits - expected).abs().max() < tolerance, dtype
        assert logits.argmax(-1).eq(expected.argmax(-1)).float().mean() > 0.9
