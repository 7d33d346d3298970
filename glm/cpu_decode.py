"""The fused decode block (glm/kernels/decode_block.h): a GLM block for a few fp32 rows in two native calls.

A decode step is slowed by the small ops between its matmuls: the bundled 17 M model spent 2.4 of its 5.9
ms a step outside them (bench/results/engine.md), a glm-600m INT4 step about a third of its time.
`block_forward` runs LayerNorm, the qkv matmul and rotary in one call, lets the cache write the new keys
and values as it always does (`Cache.update`, any layout), and runs attention, the dense matmul, the
residuals, the second LayerNorm and GeGLU in a second call. It applies where the block is plain: its
linears dense (fp32, fp16 or bf16 weights) or quantized for the CPU's own INT8 / INT4 kernel (compiled into
the block too, so a quantized matmul gives the layer's bits), none tensor-parallel, no hooks on the
block's parts (offload streams its linears through hooks); the activations fp32 on the CPU, the rows few
(<= NATIVE_MAX_ROWS), no autograd graph recorded and torch.compile not tracing. Elsewhere
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


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _plain_linear(linear: nn.Module, linear_type: type) -> bool:
    bias = linear.bias
    if linear.reduce is not None or _hooked(linear):
        return False
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return False
    if type(linear) is QuantizedLinear:
        return linear.cpu_weight() is not None
    weight = linear.weight
    return (
        type(linear) is linear_type  # another subclass (an adapter's) computes differently
        and weight.dtype in _WEIGHT_DTYPES
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and weight.shape[1] % 8 == 0
    )


def _operands(linear: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(weight, scale or None, bias) of a linear `_plain_linear` accepted, as the native block takes them."""
    if type(linear) is QuantizedLinear:
        weight, scale = linear.cpu_weight()
        return weight, scale, linear.bias
    return linear.weight, None, linear.bias


def applies(block: Any, x: Tensor, mask: Tensor, linear_type: type) -> bool:
    """Whether `block_forward` computes this block (a glm.model.GLMBlock, whose untransformed linears are
    `linear_type`) for x [b, s, h] and the float attention bias `mask`. Cheap checks first: it is asked
    once per layer and step."""
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
        return False
    attention, mlp = block.attention, block.mlp
    if attention.head_dim % 8 or (torch.is_grad_enabled() and _any_grad(block)):
        return False
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if _hooked(attention) or _hooked(mlp) or any(_hooked(n) for n in norms):  # their forward would skip it
        return False
    return all(
        _plain_linear(m, linear_type)
        for m in (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
    ) and all(
        type(n) is nn.LayerNorm
        and n.weight is not None
        and n.weight.dtype == torch.float32
        and n.bias is not None
        for n in norms
    )


def _any_grad(block: nn.Module) -> bool:
    return any(p.requires_grad for p in block.parameters())


def block_forward(block: Any, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Any) -> Tensor:
    """The block's output for x [b, s, h] (as GLMBlock.forward computes it), through the native kernels."""
    kernels = native()
    attention, mlp = block.attention, block.mlp
    ln1, ln2 = block.input_layernorm, block.post_attention_layernorm
    qkv_layer, dense, up, down = (
        attention.query_key_value,
        attention.dense,
        mlp.dense_h_to_4h,
        mlp.dense_4h_to_h,
    )
    b, s, _ = x.shape
    nh, hn = attention.num_heads, attention.head_dim
    cos, sin = cos.reshape(b * s, hn).contiguous(), sin.reshape(b * s, hn).contiguous()
    norm1 = (ln1.weight, ln1.bias, ln1.eps)
    a, qkv = kernels.attention_input(x.contiguous(), *norm1, *_operands(qkv_layer), cos, sin, nh)
    heads = qkv.view(b, s, nh, 3, hn)
    k, v = heads[:, :, :, 1].transpose(1, 2), heads[:, :, :, 2].transpose(1, 2)  # [b, nh, s, hn]
    if cache is not None:
        k, v = cache.update(attention.layer_id, k, v)
    norm2 = (ln2.weight, ln2.bias, ln2.eps)
    linears = (*_operands(dense), *norm2, *_operands(up), *_operands(down))
    return kernels.attention_output(a, qkv, k, v, mask, block.alpha, *linears, nh)
