"""glm.cpu_decode: the fused native decode block equals the modules' float64 math; it applies only to plain
blocks, and a masked key is never read."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from tolerance import assert_fp32_close, assert_model_close

import quantization.cpu
from glm import cpu_decode
from glm.cpu_matmul import native, quantized_linear
from glm.decoding.rows import Rows
from glm.model import GLM, KVCache, Linear, _rotary_from_positions, init_random_weights, rotary_tables
from quantization import QuantizationSpec
from quantization.layers import QuantizedLinear

needs_native = pytest.mark.skipif(native() is None, reason="no AVX2 or no compiler: the modules run")


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setattr(cpu_decode, "ENABLED", True)


def random_block(dtype: torch.dtype, seed: int = 0, **config_overrides):
    """A block of tiny_config with non-trivial weights (layer norms and biases random too), its linears'
    weights stored in `dtype`."""
    config = tiny_config(num_layers=1, **config_overrides)
    model = init_random_weights(GLM(config), seed=seed, std=0.3)
    generator = torch.Generator().manual_seed(seed + 1)
    block = model.transformer.layers[0]
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + (name.endswith("weight")))
        for module in block.modules():
            if isinstance(module, Linear):
                module.weight.data = module.weight.data.to(dtype)
    return config, block


def inputs(config, batch: int, width: int, cached: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    nh, hn = config.num_attention_heads, config.head_dim
    x = torch.randn(batch, width, config.hidden_size, generator=generator)
    positions = torch.randint(0, 60, (batch, width), generator=generator)
    cos, sin = rotary_tables(positions, hn, config.rotary_base, False, torch.float32)
    keys = torch.randn(batch, nh, cached, hn, generator=generator)
    values = torch.randn(batch, nh, cached, hn, generator=generator)
    masked = torch.rand(batch, 1, width, cached + width, generator=generator) < 0.3
    masked[..., cached:] = ~torch.eye(width, dtype=torch.bool)  # each new token sees itself
    bias = torch.zeros(masked.shape).masked_fill_(masked, float("-inf"))
    return x, cos, sin, keys, values, bias


def cache_of(keys, values, width: int, dtype: torch.dtype) -> KVCache:
    batch, nh, cached, hn = keys.shape
    k = torch.zeros(batch, nh, cached + width, hn, dtype=dtype)
    v = torch.zeros_like(k)
    k[:, :, :cached], v[:, :, :cached] = keys, values
    cache = KVCache([k], [v])
    cache.length = cached
    return cache


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "width", "cached"), [(1, 1, 0), (1, 1, 37), (3, 1, 5), (2, 4, 9), (1, 16, 3)]
)
def test_fused_block_equals_the_float64_modules(dtype, batch, width, cached):
    config, block = random_block(dtype, seed=batch * 100 + width)
    x, cos, sin, keys, values, bias = inputs(config, batch, width, cached, seed=cached)
    cache = cache_of(keys, values, width, torch.float32)
    with torch.no_grad():
        assert cpu_decode.applies(block, x, bias, Linear)
        got = block(x, cos, sin, bias, cache)
        reference = copy.deepcopy(block).double()  # the same stored weights, widened
        expected_cache = cache_of(keys.double(), values.double(), width, torch.float64)
        expected = reference(x.double(), cos.double(), sin.double(), bias.double(), expected_cache)
    reduction = max(config.hidden_size, config.inner_hidden_size, cached + width)
    assert_fp32_close(got, expected.float(), reduction, depth=3)  # attention, dense, MLP
    for written, want in ((cache.k[0], expected_cache.k[0]), (cache.v[0], expected_cache.v[0])):
        assert_fp32_close(written, want.float(), config.hidden_size)  # the new keys (rotary) and values


@needs_native
def test_a_masked_key_is_never_read():
    config, block = random_block(torch.float32)
    x, cos, sin, keys, values, bias = inputs(config, 2, 1, 12, seed=3)
    bias[..., 4:9] = float("-inf")
    poisoned_keys, poisoned_values = keys.clone(), values.clone()
    poisoned_keys[:, :, 4:9], poisoned_values[:, :, 4:9] = float("nan"), float("inf")
    with torch.no_grad():
        got = block(x, cos, sin, bias, cache_of(poisoned_keys, poisoned_values, 1, torch.float32))
        expected = block(x, cos, sin, bias, cache_of(keys, values, 1, torch.float32))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class UpdateOnly:
    """A cache with `update` only (as the prefix-tuning caches): the fused block runs in two calls
    around it."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def update(self, layer, k, v):
        return self.cache.update(layer, k, v)


@needs_native
@pytest.mark.parametrize(("batch", "width", "cached"), [(1, 1, 7), (3, 2, 5)])
def test_the_one_call_block_equals_the_two_calls_around_update(batch, width, cached):
    # decode_block writes the new keys and values into the cache itself; the same kernels around
    # Cache.update give the same bits, output and cache alike.
    config, block = random_block(torch.float16, seed=7)
    x, cos, sin, keys, values, bias = inputs(config, batch, width, cached, seed=1)
    one_call = cache_of(keys, values, width, torch.float32)
    two_calls = cache_of(keys, values, width, torch.float32)
    assert one_call.decode_slots(0, x) is not None
    one_call.length = cached  # decode_slots counted the tokens as written
    with torch.no_grad():
        got = block(x, cos, sin, bias, one_call)
        expected = block(x, cos, sin, bias, UpdateOnly(two_calls))
    assert one_call.length == two_calls.length == cached + width
    assert torch.equal(got, expected)
    assert torch.equal(one_call.k[0], two_calls.k[0]) and torch.equal(one_call.v[0], two_calls.v[0])


@needs_native
def test_engine_rows_decode_fused_as_the_modules():
    # Rows' cache interleaves a group's rows by position (glm/decoding/rows.py): the one-call block must
    # write row w of group g at column t * W + w and attend as the mask says, as the modules' scatter does.
    config = tiny_config(num_layers=2)
    model = init_random_weights(GLM(config), seed=3, std=0.3).eval()
    logits, caches = [], []
    for enabled in (True, False):
        cpu_decode.ENABLED = enabled
        rows = Rows(model, groups=2, width=3, max_length=12)
        generator = torch.Generator().manual_seed(0)
        for g in range(2):
            for w in range(3):
                n = 2 + g + w
                positions = torch.arange(n)
                mask = torch.zeros(n, n, dtype=torch.bool)
                ids = torch.randint(0, config.vocab_size, (n,), generator=generator).tolist()
                rows.prefill(g, w, ids, positions, mask)
        steps = []
        for j in range(3):
            columns = torch.tensor([[2 + w + j for w in range(3)], [3 + w + j for w in range(3)]])
            tokens = torch.randint(0, config.vocab_size, (2, 3), generator=generator)
            steps.append(rows.decode_one_token(tokens, columns, columns))
        logits.append(torch.stack(steps))
        caches.append(torch.stack([*rows.cache.k, *rows.cache.v]))
    assert_model_close(logits[0], logits[1], config)
    assert_model_close(caches[0], caches[1], config)


@needs_native
def test_it_applies_only_to_plain_blocks_and_few_rows():
    config, block = random_block(torch.float16)
    x, _, _, _, _, bias = inputs(config, 1, 1, 4, seed=0)
    assert not cpu_decode.applies(block, x, bias, Linear)  # parameters that want gradients, recorded
    cpu_decode.ENABLED = False
    with torch.no_grad():
        assert not cpu_decode.applies(block, x, bias, Linear)  # off unless GLM_FUSED_DECODE=1
    cpu_decode.ENABLED = True
    with torch.no_grad():
        assert cpu_decode.applies(block, x, bias, Linear)
        assert not cpu_decode.applies(block, torch.randn(1, 17, config.hidden_size), bias, Linear)  # prefill
        assert not cpu_decode.applies(block, x.double(), bias, Linear)
        assert not cpu_decode.applies(block, x, bias > 0, Linear)  # a bool mask: the modules' SDPA
    block.requires_grad_(False)
    assert cpu_decode.applies(block, x, bias, Linear)  # inference with grad mode on
    assert not cpu_decode.applies(block, x.clone().requires_grad_(), bias, Linear)
    handle = block.mlp.dense_4h_to_h.register_forward_pre_hook(lambda *_: None)  # as offload's streaming
    assert not cpu_decode.applies(block, x, bias, Linear)
    handle.remove()
    block.attention.dense.reduce = lambda t: t  # tensor parallelism's row-parallel layer
    assert not cpu_decode.applies(block, x, bias, Linear)
    block.attention.dense.reduce = None
    assert cpu_decode.applies(block, x, bias, Linear)

    class Quantized(Linear):  # a transform's subclass computes its own way
        pass

    block.mlp.dense_h_to_4h.__class__ = Quantized
    assert not cpu_decode.applies(block, x, bias, Linear)


QUANTIZED = [
    QuantizationSpec(8),
    QuantizationSpec(8, "group", 32),
    QuantizationSpec(4),
    QuantizationSpec(4, "group", 64),
]
# Widths the CPU's INT8 / INT4 kernel takes (every layer's input a multiple of 32 columns).
QUANTIZABLE = dict(hidden_size=64, inner_hidden_size=128)


def quantize_block(block, spec: QuantizationSpec):
    """The block with its four linears swapped for quantized layers loaded from their float weights."""
    for parent, name in (
        (block.attention, "query_key_value"),
        (block.attention, "dense"),
        (block.mlp, "dense_h_to_4h"),
        (block.mlp, "dense_4h_to_h"),
    ):
        linear = getattr(parent, name)
        weight, bias = linear.weight.detach().float(), linear.bias.detach()
        QuantizedLinear.swap(parent, name, spec, False)
        layer = getattr(parent, name)
        layer.load_weight("weight", weight, torch.float32, torch.device("cpu"))
        layer.load_weight("bias", bias, torch.float32, torch.device("cpu"))
        layer.finish_loading()
    return block


@needs_native
@pytest.mark.parametrize("spec", QUANTIZED, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
def test_native_linear_multiplies_a_quantized_weight_as_its_layer_does(spec, rows, monkeypatch):
    # The fused block runs the quantized layer's own kernel (quantization/cpu_gemv.h), compiled into the
    # dense extension too: bit for bit what the layer computes, its decode kernel up to 8 rows and above
    # that the blocked GEMM glm.quantize registers for it.
    monkeypatch.setattr(quantization.cpu, "_prefill_gemm", [quantized_linear])
    _, block = random_block(torch.float32, seed=rows, **QUANTIZABLE)
    layer = quantize_block(block, spec).mlp.dense_h_to_4h
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)) * 2
    weight, scale = layer.cpu_weight()
    with torch.no_grad():
        assert torch.equal(native().linear(x, weight, layer.bias, scale), layer(x))


@needs_native
@pytest.mark.parametrize("spec", QUANTIZED, ids=str)
@pytest.mark.parametrize(("batch", "width", "cached"), [(1, 1, 0), (1, 1, 37), (3, 1, 5), (2, 4, 9)])
def test_fused_quantized_block_equals_the_modules(spec, batch, width, cached):
    config, block = random_block(torch.float32, seed=batch * 10 + width, **QUANTIZABLE)
    block = quantize_block(block, spec)
    x, cos, sin, keys, values, bias = inputs(config, batch, width, cached, seed=cached)
    with torch.no_grad():
        assert cpu_decode.applies(block, x, bias, Linear)
        cache = cache_of(keys, values, width, torch.float32)
        got = block(x, cos, sin, bias, cache)
        cpu_decode.ENABLED = False
        expected_cache = cache_of(keys, values, width, torch.float32)
        expected = block(x, cos, sin, bias, expected_cache)
    # Both sides run the same integer matmuls; the small ops between them (the layer norms first) sum in
    # another order, which can move an activation's int16 rounding (1 / 65534 of its row's largest value)
    # by one step. 1e-4 of each result's largest value bounds that; a wrong weight, scale, nibble or group
    # order gives 1e-2 and up.
    pairs = ((got, expected), (cache.k[0], expected_cache.k[0]), (cache.v[0], expected_cache.v[0]))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


@needs_native
def test_a_quantized_layer_outside_the_cpu_kernel_runs_the_modules():
    config, block = random_block(torch.float32, **QUANTIZABLE)
    block = quantize_block(block, QuantizationSpec(4)).requires_grad_(False)
    x, _, _, _, _, bias = inputs(config, 1, 1, 4, seed=0)
    assert cpu_decode.applies(block, x, bias, Linear)
    handle = block.attention.register_forward_pre_hook(lambda *_: None)  # offload streams the attention
    assert not cpu_decode.applies(block, x, bias, Linear)
    handle.remove()
    block.mlp.dense_4h_to_h.set_kernel(lambda x, w, s: x)  # a kernel of its own
    assert not cpu_decode.applies(block, x, bias, Linear)


@pytest.mark.parametrize("fp16_tables", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_a_decode_steps_rotary_rows_are_looked_up_with_the_same_bits(fp16_tables, head_dim):
    # A few positions are rows of a table made once; the elementwise formula gives the same bits at any
    # position of any tensor, so looking up equals computing.
    positions = torch.randint(0, 3000, (4, 3), generator=torch.Generator().manual_seed(head_dim))
    looked_up = rotary_tables(positions, head_dim, 10000.0, fp16_tables, torch.float32)
    computed = _rotary_from_positions(positions, head_dim, 10000.0, fp16_tables, torch.float32)
    for got, expected in zip(looked_up, computed, strict=True):
        assert got.shape == (4, 3, 1, head_dim)
        assert torch.equal(got, expected)
