"""Weight-only INT8 / INT4 quantization (the original's `quantization/`), a library that imports torch and
nothing of glm: schemes and packing (spec.py, schemes.py), the quantized layers (layers.py), kernels (cpu.py
+ cpu_kernels.cpp, cuda.py) and the C++ extension loader both this package and glm use (native.py).

glm plugs it in through its load pipeline's transform slot (glm/quantize.py; checkpoints:
glm/quantized_checkpoint.py):

    from glm.loading import load_model
    from glm.quantize import quantization_transform
    model, tokenizer = load_model(folder, transforms=[quantization_transform(4)])
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so `quantization.spec` (the command lines' choices) loads without torch.
_EXPORTS = {
    "QuantizedLinear": "quantization.layers",
    "QuantizedOutputLayer": "quantization.layers",
    "dequantize": "quantization.schemes",
    "quantize_weight": "quantization.schemes",
    "QuantizationSpec": "quantization.spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantization' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
