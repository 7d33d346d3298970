"""The adapter methods by name: how each is applied to a model, read out of it and loaded into it, so the
fine-tuning loop and the adapter files treat LoRA (`glm.adapters.lora`) and P-tuning v2
(`glm.adapters.prefix`) alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from glm.adapters import lora, prefix
from glm.model import GLM


@dataclass(frozen=True)
class Method:
    name: str
    options: type  # LoRAOptions or PrefixOptions: to_dict / from_dict
    attribute: str  # where `apply` keeps the options on the model
    apply: Callable[..., GLM]  # (model, options, seed=..., initialise=...) -> model
    full_state_dict: Callable[[GLM], dict[str, Tensor]]
    load_full_state_dict: Callable[[GLM, dict[str, Tensor]], None]
    mergeable: bool
    # (model) -> (key, this rank's part) -> whole, and its inverse: for tensors shaped as the adapter's
    # (optimizer moments), so a fine-tuning state is the same whatever tensor-parallel size wrote it
    whole: Callable[[GLM], Callable[[str, Tensor], Tensor]]
    part: Callable[[GLM], Callable[[str, Tensor], Tensor]]


def _apply_lora(model: GLM, options: lora.LoRAOptions, seed: int = 0, initialise: bool = True) -> GLM:
    return lora.apply_lora(model, options, seed=seed)  # B = 0: nothing to initialise from the model


METHODS = {
    "lora": Method(
        "lora",
        lora.LoRAOptions,
        "lora",
        _apply_lora,
        lora.full_state_dict,
        lora.load_full_state_dict,
        True,
        lora.whole,
        lora.part,
    ),
    "ptuning": Method(
        "ptuning",
        prefix.PrefixOptions,
        "ptuning",
        prefix.apply_prefix,
        prefix.full_state_dict,
        prefix.load_full_state_dict,
        False,
        prefix.whole,
        prefix.part,
    ),
}


def method_of(model: GLM) -> tuple[Method, Any]:
    """The method applied to `model` and its options; a ValueError unless exactly one is."""
    found = [(m, getattr(model, m.attribute)) for m in METHODS.values() if hasattr(model, m.attribute)]
    if len(found) != 1:
        raise ValueError(f"the model holds {len(found)} adapters; an adapter file holds exactly one")
    return found[0]


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"adapter method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]
