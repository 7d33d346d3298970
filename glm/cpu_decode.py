"""The fused decode block (glm/kernels/decode_block.h): a GLM block for a few fp32 rows in one native call.

A decode step is slowed by the small ops between its matmuls: the bundled 17 M model spent 2.4 of its 5.9
ms a step outside them (bench/results/engine.md), a glm-600m INT4 step about a third of its time.
`block_forward` runs the whole block in `decode_block`: LayerNorm, the qkv matmul and rotary, the write of
the new keys and values into the cache's buffers (where the cache's `decode_slots` says, glm.model.Cache),
attention, the dense matmul, the residuals, the second LayerNorm and GeGLU. A cache without
`decode_slots` (the prefix-tuning caches) gets two calls around its `update`. It applies where the block is
plain: its linears dense (fp32, fp16 or bf16 weights) or quantized for the CPU's own INT8 / INT4 kernel
(compiled into the block too, so a quantized matmul gives the layer's bits), none tensor-parallel, no
hooks on the block's parts (offload streams its linears through hooks); the activations fp32 on the CPU,
the rows few (<= NATIVE_MAX_ROWS), no autograd graph recorded and torch.compile not tracing. Elsewhere
GLMBlock.forward runs the modules.

On by default; GLM_FUSED_DECODE=0 runs the modules everywhere. The two agree to fp32 rounding, not bit for
bit (attention and the small ops sum in another order; tests/test_cpu_decode.py bounds the difference).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from glm.cpu_matmul import NATIVE_MAX_ROWS, native
from quantization.layers import QuantizedLinear

_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENABLED = os.environ.get("GLM_FUSED_DECODE", "1") != "0"


LinearOperands = tuple[Tensor, Tensor | None, Tensor | None]  # (weight, scale or None: dense, bias)
# What `attention_input` and `attention_output` take besides the activations: qkv, then the layer norms'
# (weight, bias, eps) and the dense, up and down linears.
Operands = tuple[LinearOperands, tuple, LinearOperands, tuple, LinearOperands, LinearOperands]


# The checks below run for every block of every decode step, so they read the modules' dicts directly:
# nn.Module.__getattr__ costs ~2 us a lookup, some 40 us a block.
def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _linear(linear: nn.Module, linear_type: type) -> LinearOperands | None:
    """A linear layer's operands, or None where it computes otherwise."""
    kind = type(linear)
    if kind is not linear_type and kind is not QuantizedLinear:  # another subclass (an adapter's)
        return None
    if linear.reduce is not None or _hooked(linear):
        return None
    bias = linear._parameters.get("bias")
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return None
    if kind is QuantizedLinear:
        stored = linear.cpu_weight()
        return None if stored is None else (*stored, bias)
    weight = linear._parameters.get("weight")
    plain = (
        weight is not None
        and weight.dtype in _WEIGHT_DTYPES
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and weight.shape[1] % 8 == 0
    )
    return (weight, None, bias) if plain else None


def _norm(norm: nn.Module) -> tuple | None:
    weight, bias = norm._parameters.get("weight"), norm._parameters.get("bias")
    plain = type(norm) is nn.LayerNorm and not _hooked(norm) and weight is not None and bias is not None
    return (weight, bias, norm.eps) if plain and weight.dtype == torch.float32 else None


def operands(block: Any, x: Tensor, mask: Tensor, linear_type: type) -> Operands | None:
    """What `block_forward` needs to compute this block (a glm.model.GLMBlock, whose untransformed linears
    are `linear_type`) for x [b, s, h] and the float attention bias `mask`; None where the modules run.
    Cheap checks first."""
    if (
        not ENABLED
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.dim() != 3
        or x.shape[0] * x.shape[1] > NATIVE_MAX_ROWS
        or mask.dtype != torch.float32
        or (torch.is_grad_enabled() and x.requires_grad)
        or torch.compiler.is_compiling()
        or native() is None
    ):
        return None
    children = block._modules
    attention, mlp = children["attention"], children["mlp"]
    if attention.head_dim % 8 or (torch.is_grad_enabled() and _any_grad(block)):
        return None
    if _hooked(attention) or _hooked(mlp):  # their forward would be skipped
        return None
    attention_linears, mlp_linears = attention._modules, mlp._modules
    parts = (
        _linear(attention_linears["query_key_value"], linear_type),
        _norm(children["input_layernorm"]),
        _linear(attention_linears["dense"], linear_type),
        _norm(children["post_attention_layernorm"]),
        _linear(mlp_linears["dense_h_to_4h"], linear_type),
        _linear(mlp_linears["dense_4h_to_h"], linear_type),
    )
    return None if None in parts else parts


def applies(block: Any, x: Tensor, mask: Tensor, linear_type: type) -> bool:
    """Whether `block_forward` computes this block (see `operands`)."""
    return operands(block, x, mask, linear_type) is not None


def _any_grad(block: nn.Module) -> bool:
    return any(p.requires_grad for p in block.parameters())


def block_forward(
    block: Any, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Any, parts: Operands
) -> Tensor:
    """The block's output for x [b, s, h] (as GLMBlock.forward computes it) through the native kernels,
    with the block's `operands`: one call where the cache says where the new keys and values go
    (`decode_slots`), else two calls around `cache.update`."""
    kernels = native()
    qkv_linear, norm1, dense, norm2, up, down = parts
    attention = block._modules["attention"]
    nh = attention.num_heads
    slots = getattr(cache, "decode_slots", None)
    target = None if slots is None else slots(attention.layer_id, x)
    if target is not None:
        keys, values, columns, length = target
        return kernels.decode_block(
            x.contiguous(), cos.contiguous(), sin.contiguous(), mask, keys, values, columns, length,
            block.alpha, nh,
            *norm1, *qkv_linear, *dense, *norm2, *up, *down,
        )  # fmt: skip
    b, s, _ = x.shape
    hn = attention.head_dim
    cos, sin = cos.contiguous(), sin.contiguous()
    a, qkv = kernels.attention_input(x.contiguous(), *norm1, *qkv_linear, cos, sin, nh)
    heads = qkv.view(b, s, nh, 3, hn)
    k, v = heads[:, :, :, 1].transpose(1, 2), heads[:, :, :, 2].transpose(1, 2)  # [b, nh, s, hn]
    if cache is not None:
        k, v = cache.update(attention.layer_id, k, v)
    return kernels.attention_output(a, qkv, k, v, mask, block.alpha, *dense, *norm2, *up, *down, nh)
