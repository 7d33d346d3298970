"""Quantized checkpoints: their metadata, quantizing checkpoint tensors (tools/convert_tp.py), and the
transform that loading a checkpoint needs (glm.load, the command lines).

A quantized checkpoint keeps the original layout and keys (`<linear>.weight` int8, `<linear>.weight_scale`
fp16) and records in model_config.json

    "quantization_bit_width": 4,
    "quantization": {"format_version": 1, "scheme": "row", "group_size": null,
                     "quantized_at_tensor_parallel_size": 8}

so it loads with no flags. The original's quantized checkpoints have no model_config.json: they load with
`--quantization-bit-width N --from-quantized-checkpoint`, as in the original. What a checkpoint holds is
read from its metadata; only a checkpoint whose metadata records no bit width is looked at for
`weight_scale` keys, in the memory-mapped rank files the load then reads its weights from (one
CheckpointFolder, opened once).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import Tensor

from glm.checkpoint import CheckpointError, CheckpointFolder, ShardedCheckpoint, open_checkpoint
from glm.loading import Transform
from glm.quantize import QUANTIZED_LINEARS, quantization_transform
from quantization.schemes import quantize_to_stored
from quantization.spec import QuantizationSpec

FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = tuple(f"{parent}.{name}.weight" for parent, name in QUANTIZED_LINEARS)


def is_quantized_weight(key: str) -> bool:
    """Whether `key` is one of the four block weights that quantization replaces."""
    return key.startswith("transformer.layers.") and key.endswith(_WEIGHT_SUFFIXES)


def quantize_checkpoint_tensor(key: str, tensor: Tensor, spec: QuantizationSpec) -> dict[str, Tensor]:
    """The checkpoint entries for one rank's slice of `key`: {key: int8, key + "_scale": fp16} for the
    four block weights, {key: tensor} for everything else. Quantize each target rank's slice (row-parallel
    shards keep their own scales, as the original)."""
    if not is_quantized_weight(key):
        return {key: tensor}
    if not tensor.is_floating_point():
        raise CheckpointError(f"{key} is already quantized ({tensor.dtype}); it cannot be quantized again")
    weight, scale = quantize_to_stored(tensor, spec)
    return {key: weight, key + "_scale": scale}


def quantization_metadata(spec: QuantizationSpec, tensor_parallel_size: int) -> dict[str, Any]:
    """The model_config.json entries of a checkpoint quantized with `spec` (write_checkpoint's
    extra_metadata)."""
    return {
        "quantization_bit_width": spec.bits,
        "quantization": {
            "format_version": FORMAT_VERSION,
            "scheme": spec.scheme,
            "group_size": spec.group_size,
            "quantized_at_tensor_parallel_size": tensor_parallel_size,
        },
    }


def spec_from_metadata(
    meta: dict[str, Any] | None, source: str = "model_config.json"
) -> QuantizationSpec | None:
    """The spec a checkpoint was quantized with, or None for a float checkpoint."""
    bits = (meta or {}).get("quantization_bit_width")
    if not bits:
        return None
    info = meta.get("quantization")
    if not isinstance(info, dict):
        raise CheckpointError(f"{source}: quantization_bit_width {bits} without a 'quantization' entry")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: quantization format_version {info['format_version']}; upgrade this project"
        )
    try:
        return QuantizationSpec(bits, info.get("scheme", "row"), info.get("group_size"))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


class ConversionPlan:
    """What tools/convert_tp.py writes for each key and into model_config.json, for an input checkpoint
    and its --quantization-* flags: float inputs are quantized per target rank when `bits` is given;
    quantized inputs are re-sharded as they are (exactly: glm/sharding.py's SCALE_GROUPS) and keep their
    metadata."""

    def __init__(
        self,
        checkpoint: ShardedCheckpoint,
        meta: dict[str, Any] | None,
        bits: int | None = None,
        scheme: str = "row",
        group_size: int | None = None,
    ) -> None:
        stored = spec_from_metadata(meta, str(checkpoint.folder / "model_config.json"))
        if stored is None and has_scales(checkpoint):
            if bits is None:
                raise CheckpointError(
                    f"{checkpoint.folder} holds quantized weights but records no bit width: pass "
                    "--quantization-bit-width 4 or 8 (the width it was quantized with)"
                )
            stored = QuantizationSpec(bits)  # the original's quantized checkpoints: per-row scales
            self._metadata = quantization_metadata(stored, checkpoint.tensor_parallel_size)
        elif stored is not None:
            self._metadata = {
                "quantization_bit_width": meta["quantization_bit_width"],
                "quantization": meta["quantization"],
            }
        if stored is not None:
            if bits is not None and bits != stored.bits:
                raise CheckpointError(
                    f"{checkpoint.folder} is an INT{stored.bits} checkpoint: it cannot be converted to "
                    f"INT{bits} (quantize the float checkpoint instead)"
                )
            self.spec: QuantizationSpec | None = None  # nothing to quantize
        else:
            self.spec = None if bits is None else QuantizationSpec(bits, scheme, group_size)
            self._metadata = {}
        self.quantized_output = stored is not None or self.spec is not None

    def entries(self, key: str, piece: Tensor) -> dict[str, Tensor]:
        """The output entries for one target rank's slice of `key`."""
        return {key: piece} if self.spec is None else quantize_checkpoint_tensor(key, piece, self.spec)

    def metadata(self, target_tp: int) -> dict[str, Any]:
        """write_checkpoint's extra_metadata for the output."""
        return quantization_metadata(self.spec, target_tp) if self.spec is not None else self._metadata


def has_scales(checkpoint: ShardedCheckpoint) -> bool:
    """Whether the checkpoint holds quantized weights (their `weight_scale` keys)."""
    return any(key.endswith(".weight_scale") for key in checkpoint.keys)


def checkpoint_transform(
    checkpoint: str | Path | CheckpointFolder,
    bits: int | None = None,
    scheme: str = "row",
    group_size: int | None = None,
    from_quantized_checkpoint: bool = False,
    output_layer: bool = False,
) -> Transform | None:
    """The quantize transform loading `checkpoint` needs (None: load it as it is), from its metadata and
    the CLI's --quantization-* flags; the original's confusions are one-line errors naming the fix. Pass
    the CheckpointFolder the load will read, so that the checkpoint is opened once."""
    source = open_checkpoint(checkpoint)
    folder = source.folder
    stored = spec_from_metadata(source.metadata, str(folder / "model_config.json"))
    if stored is not None:
        if bits is not None and bits != stored.bits:
            raise CheckpointError(
                f"{folder} is an INT{stored.bits} checkpoint: drop --quantization-bit-width {bits} "
                "(quantized checkpoints load with their own bit width; re-quantize from the float checkpoint)"
            )
        return quantization_transform(
            stored.bits, stored.scheme, stored.group_size, output_layer, from_quantized_checkpoint=True
        )
    quantized = has_scales(source.shards)
    if quantized and bits is None:
        raise CheckpointError(
            f"{folder} holds quantized weights (weight_scale keys) but records no bit width: pass "
            "--quantization-bit-width 4 or 8 and --from-quantized-checkpoint"
        )
    if from_quantized_checkpoint and not quantized:
        raise CheckpointError(
            f"{folder} has no weight_scale keys, so it is not quantized: drop --from-quantized-checkpoint "
            "(with --quantization-bit-width its float weights are quantized while loading)"
        )
    if from_quantized_checkpoint and bits is None:
        raise CheckpointError("--from-quantized-checkpoint needs --quantization-bit-width 4 or 8")
    if bits is None:
        if output_layer:
            raise CheckpointError("--quantize-output-layer needs --quantization-bit-width 4 or 8")
        return None
    return quantization_transform(bits, scheme, group_size, output_layer, quantized)


def transform_from_args(
    args: argparse.Namespace, checkpoint: str | Path | CheckpointFolder
) -> Transform | None:
    """The quantize transform (or None) for loading `checkpoint` with these flags."""
    if args.quantization_group_size is not None and args.quantization_scheme != "group":
        raise ValueError("--quantization-group-size needs --quantization-scheme group")
    return checkpoint_transform(
        checkpoint,
        args.quantization_bit_width,
        args.quantization_scheme,
        args.quantization_group_size,
        args.from_quantized_checkpoint,
        args.quantize_output_layer,
    )
