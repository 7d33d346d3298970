"""The quantize transform, glm's one seam with the `quantization` library:
swap the four linear layers of every block for quantized ones, on the meta
model before any weight is read (after tensor-parallel sharding, so each rank quantizes its own shard).

Quantized, as the original: `attention.query_key_value`, `attention.dense`, `mlp.dense_h_to_4h`,
`mlp.dense_4h_to_h`. Word embeddings, LayerNorms and biases stay in the model's dtype; the biases are kept
(the original's quantize-after-loading path replaced the layers with zero biases, losing them). Optionally
the tied output layer gets an INT8 copy of the embeddings (`output_layer=True`; not in the original).

The quantized layers are plain modules of the library, not subclasses of glm.model.Linear: they keep the
replaced layer's `reduce` (set by the tensor-parallel transform, which runs first) and receive their tensors
through the loader's `load_weight` / `finish_loading` hooks. `model.quantization` records the spec. Their
fp32 prefill matmuls on the CPU run glm's blocked GEMM, which dequantises per tile (registered here).
"""

from __future__ import annotations

import functools

from glm import cpu_matmul
from glm.loading import Transform
from glm.model import GLM
from quantization.cpu import use_prefill_gemm
from quantization.layers import QuantizedLinear, QuantizedOutputLayer
from quantization.spec import QuantizationSpec

QUANTIZED_LINEARS = (
    ("attention", "query_key_value"),
    ("attention", "dense"),
    ("mlp", "dense_h_to_4h"),
    ("mlp", "dense_4h_to_h"),
)


def quantize(
    model: GLM,
    bits: int,
    scheme: str = "row",
    group_size: int | None = None,
    output_layer: bool = False,
    from_quantized_checkpoint: bool = False,
) -> GLM:
    """Swap in quantized layers (in place; returns the model). `from_quantized_checkpoint` makes float
    weights in the checkpoint an error instead of quantizing them while loading."""
    spec = QuantizationSpec(bits, scheme, group_size)
    use_prefill_gemm(cpu_matmul.quantized_linear)
    for layer in model.transformer.layers:
        for parent_name, name in QUANTIZED_LINEARS:
            QuantizedLinear.swap(getattr(layer, parent_name), name, spec, from_quantized_checkpoint)
    if output_layer:
        model.output_layer = QuantizedOutputLayer(
            model.transformer.word_embeddings, model.output_layer.gather
        )
    model.quantization = spec
    return model


def quantization_transform(
    bits: int,
    scheme: str = "row",
    group_size: int | None = None,
    output_layer: bool = False,
    from_quantized_checkpoint: bool = False,
) -> Transform:
    """`quantize` with its settings bound: a transform for glm.loading.load_model(transforms=[...])."""
    QuantizationSpec(bits, scheme, group_size)  # bad settings fail here, before any loading
    return functools.partial(
        quantize,
        bits=bits,
        scheme=scheme,
        group_size=group_size,
        output_layer=output_layer,
        from_quantized_checkpoint=from_quantized_checkpoint,
    )
