"""fp32 matmuls on the CPU through glm/kernels/ (gemv.h for <= 16 rows, gemm.h for more), else F.linear;
and the quantized layers' fp32 prefill GEMM (`quantized_linear`, registered by glm/quantize.py).

A decode step multiplies one to a few rows by every weight, so it runs at the speed the weights stream
from memory. On the measured AVX2 machine MKL's F.linear with a few rows reaches 12-16 GB/s where the
native loop reaches 20-26 (bench/results/cpu-matmul.json); for many rows (prefill) the native blocked
GEMM beats MKL's sgemm by 1.15-1.8 x (bench/results/cpu-gemm.md). The native path needs fp32
activations, an AVX2 CPU and a compiler (quantization/native.py, the one extension loader); it takes
fp32, fp16 or bf16 weights (widened exactly in registers), so weights may stay in their checkpoint's half
precision while the model computes in fp32. It is never used where autograd records a graph. Under
torch.compile it is the custom op `glm::linear`, so the compiled decode step keeps it without graph breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from quantization.native import load_extension

# Rows up to which the fused decode block applies (glm/cpu_decode.py); the native linear takes any number:
# up to 16 rows it streams the weights (gemv.h), from 17 it runs the blocked GEMM (gemm.h).
NATIVE_MAX_ROWS = 16
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_kernels: list[ModuleType | None] = []  # filled on first use (a plain global: torch.compile reads it as is)


def native() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (then F.linear does everything)."""
    if not _kernels:
        _kernels.append(load_extension("glm_cpu_kernels", Path(__file__).parent / "kernels" / "module.cpp"))
    return _kernels[0]


@torch.library.custom_op("glm::linear", mutates_args=())
def native_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The native kernel as an op torch.compile can keep: x [..., K] fp32, weight [N, K] -> [..., N]."""
    kernels = native()
    assert kernels is not None
    return kernels.linear(x, weight, bias)


@native_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _native_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # Called for every linear layer of every decode step: cheap checks first, no tensor made.
    return (
        x.dtype == torch.float32
        and x.is_cpu
        and x.numel() > 0
        and x.shape[-1] % 8 == 0
        and weight.dtype in _WEIGHT_DTYPES
        and weight.is_cpu
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and native() is not None
    )


def quantized_linear(x: Tensor, weight: Tensor, scale: Tensor, bits: int) -> Tensor | None:
    """x [M, K] fp32 times an INT8 / INT4 weight as quantization/schemes.py stores it (scale fp16 [N,
    groups]), dequantised per packed tile inside the blocked GEMM (exactly: the fp32 GEMM of the dequantised
    weight); None where the native kernels do not apply (quantization/cpu.py then dequantises tiles)."""
    if not (x.is_cpu and weight.is_cpu and x.shape[-1] % 8 == 0 and (x.shape[-1] // scale.shape[1]) % 8 == 0):
        return None
    kernels = native()
    return None if kernels is None else kernels.quantized_linear(x, weight, scale, bits)


def unique_argmax(scores: Tensor, skip: Sequence[slice], floor: float) -> Tensor | None:
    """Each row's argmax [N] for scores [N, V], where every row's largest value occurs once, is a number and
    lies above `floor`, the columns in the `skip` slices left out; None where some row's does not or the
    native kernels do not apply (the caller then decides with torch ops)."""
    kernels = native()
    if kernels is None or scores.dtype != torch.float32 or not scores.is_cpu or not scores.is_contiguous():
        return None
    vocab = scores.shape[-1]
    bounds = []
    for part in skip:
        start, stop, step = part.indices(vocab)
        if step != 1:
            return None
        bounds += [start, stop]
    index, all_found = kernels.unique_argmax(scores, bounds, floor)
    return index if all_found else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T (+ bias), like F.linear; a weight in another dtype than x is widened (or cast) to x's."""
    if _native_applies(x, weight, bias):
        if not x.is_contiguous():
            x = x.contiguous()
        if torch.compiler.is_compiling():
            return native_linear(x, weight, bias)
        return native().linear(x, weight, bias)  # the custom op's dispatch would cost more than it runs
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return F.linear(x, weight, bias)
