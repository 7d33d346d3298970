"""Weight-only INT8 / INT4 quantization of GLM-130B's block linears (the original's `quantization/`).

    from glm.loading import load_model
    from quantization import quantization_transform
    model, tokenizer = load_model(folder, transforms=[quantization_transform(4)])

Schemes and checkpoint format: schemes.py; the transform: transform.py; layers: layers.py; kernels:
cpu.py (+ cpu_kernels.cpp), cuda.py; quantized checkpoints and CLI flags: checkpoint.py, cli.py.
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so `quantization.cli` (the command lines' flags) loads without torch.
_EXPORTS = {
    "ConversionPlan": "quantization.checkpoint",
    "checkpoint_transform": "quantization.checkpoint",
    "quantization_metadata": "quantization.checkpoint",
    "quantize_checkpoint_tensor": "quantization.checkpoint",
    "spec_from_metadata": "quantization.checkpoint",
    "add_quantization_arguments": "quantization.cli",
    "transform_from_args": "quantization.cli",
    "QuantizedLinear": "quantization.layers",
    "QuantizedOutputLayer": "quantization.layers",
    "QuantizationSpec": "quantization.schemes",
    "dequantize": "quantization.schemes",
    "quantize_weight": "quantization.schemes",
    "quantization_transform": "quantization.transform",
    "quantize": "quantization.transform",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantization' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
