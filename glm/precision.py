"""The one line a run prints at start-up: the dtype it computes in and the path each kind of matmul takes.

The paths depend on the machine (a compiled native kernel or torch's own), the arithmetic does not: an fp32
model computes in fp32 everywhere (see quantization/cpu.py for the one documented approximation, the INT8 /
INT4 decode kernel's int16 activations), so this line is what tells two machines' runs apart, if anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantization.spec import QuantizationSpec

if TYPE_CHECKING:
    from glm.model import GLM


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quantized_bits(model: nn.Module) -> list[int]:
    """The bit widths of the model's quantized matmuls (the modules carrying a QuantizationSpec)."""
    return sorted(
        {m.spec.bits for m in model.modules() if isinstance(getattr(m, "spec", None), QuantizationSpec)}
    )


def describe_matmuls(model: GLM) -> str:
    """`glm: float32 on cpu; dense matmuls: ...; INT4 matmuls: ...` for a loaded model."""
    from glm import cpu_matmul
    from glm.model import Linear
    from quantization.native import selected_isa as quantization_isa

    device, dtype = model.device, model.dtype
    stored = {
        m.weight.dtype for m in model.modules() if isinstance(m, Linear) and m.weight.is_floating_point()
    }
    stored -= {dtype}
    widened = (
        f", {'/'.join(map(_dtype_name, sorted(stored, key=str)))} weights widened exactly" if stored else ""
    )
    parts = [f"glm: {_dtype_name(dtype)} on {device.type}"]
    if device.type == "cpu" and dtype == torch.float32 and cpu_matmul.native() is not None:
        parts.append(
            f"dense matmuls: the native {quantization_isa()} kernels (<= 16 rows streamed, more a "
            f"blocked GEMM; fp32 arithmetic{widened})"
        )
    else:
        parts.append(f"dense matmuls: torch ({_dtype_name(dtype)}{widened})")
    for bits in _quantized_bits(model):
        parts.append(f"INT{bits} matmuls: {_quantized_path(bits, device, dtype)}")
    return "; ".join(parts)


def _quantized_path(bits: int, device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        from quantization.cuda import fused_int4_available

        if bits == 4 and fused_int4_available(device):
            return "fused tinygemm int4pack (bf16 activations; shapes it cannot tile: dequantised tiles)"
        return f"dequantised tiles, then torch ({_dtype_name(dtype)})"
    from quantization.cpu import DECODE_MAX_ROWS, matmul_dtype, native_kernels

    dense = _dtype_name(matmul_dtype(dtype))
    if native_kernels() is not None:  # any activation dtype: the kernel takes them as fp32
        decode = f"<= {DECODE_MAX_ROWS} rows the native AVX2 kernel (activations rounded to int16 per row)"
    elif dtype == torch.bfloat16:
        decode = f"<= {DECODE_MAX_ROWS} rows torch's fused int{bits}pack op (bf16)"
    else:
        decode = f"<= {DECODE_MAX_ROWS} rows dequantised tiles ({dense})"
    return f"{decode}, more rows dequantised tiles ({dense})"
