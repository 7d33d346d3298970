"""How far apart two fp32 results may be when they differ only in the order of their sums.

Another BLAS kernel, another CPU's vector width or another batch layout adds the same products in another
order. Each k-term fp32 dot product is then off by a few units of rounding of its magnitude, growing like
sqrt(k) (the rounding errors are independent, a random walk); a result computed through `depth` such
reductions in sequence (layers) can carry `depth` of them. The tolerance below is 8 x that. The one
difference reported from another CPU kind (AVX-512: 1.14e-5 on sat_tiny's logits of magnitude ~5, longest
reduction 160, depth 3) is 0.5 x the unit. The allowance is 3.6e-5 of the values' largest magnitude for
sat_tiny and 2.1e-4 for the bundled model (1024-term reductions, depth 7), far below what a wrong mask,
position, weight or kernel gives (1e-2 and up).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7
HEADROOM = 8


def fp32_tolerance(expected: Tensor, reduction: int, depth: int = 1) -> float:
    """The absolute difference allowed between two fp32 computations of `expected` whose longest dot
    products have `reduction` terms, `depth` of them in sequence."""
    return HEADROOM * FP32_EPS * math.sqrt(reduction) * depth * float(expected.abs().max())


def assert_fp32_close(got: Tensor, expected: Tensor, reduction: int, depth: int = 1) -> None:
    """`got` equals `expected` up to fp32 summation order (see the module's docstring)."""
    tolerance = fp32_tolerance(expected, reduction, depth)
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


def assert_model_close(got: Tensor, expected: Tensor, config) -> None:
    """`got` equals `expected`, outputs of a GLM with `config` (logits, hidden states, K/V), up to fp32
    summation order: its longest reduction is the MLP's (or the hidden size), one per layer and one for the
    output layer."""
    reduction = max(config.hidden_size, config.inner_hidden_size)
    assert_fp32_close(got, expected, reduction, depth=config.num_layers + 1)
