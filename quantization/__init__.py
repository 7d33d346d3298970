"""Weight-only INT8 / INT4 quantization of GLM-130B's block linears (the original's `quantization/`).

    from glm.loading import load_model
    from quantization import quantization_transform
    model, tokenizer = load_model(folder, transforms=[quantization_transform(4)])

Schemes and checkpoint format: schemes.py; the transform: transform.py; layers: layers.py; kernels:
cpu.py (+ cpu_kernels.cpp), cuda.py; quantized checkpoints and CLI flags: checkpoint.py, cli.py.
"""

from quantization.checkpoint import (
    ConversionPlan,
    checkpoint_transform,
    quantization_metadata,
    quantize_checkpoint_tensor,
    spec_from_metadata,
)
from quantization.cli import add_quantization_arguments, transform_from_args
from quantization.layers import QuantizedLinear, QuantizedOutputLayer
from quantization.schemes import QuantizationSpec, dequantize, quantize_weight
from quantization.transform import quantization_transform, quantize

__all__ = [
    "ConversionPlan",
    "QuantizationSpec",
    "QuantizedLinear",
    "QuantizedOutputLayer",
    "add_quantization_arguments",
    "checkpoint_transform",
    "dequantize",
    "quantization_metadata",
    "quantization_transform",
    "quantize",
    "quantize_checkpoint_tensor",
    "quantize_weight",
    "spec_from_metadata",
    "transform_from_args",
]
