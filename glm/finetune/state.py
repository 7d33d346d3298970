"""The fine-tuning state file (OUTPUT/finetune_state.pt): adapter, AdamW state, step, settings and base
identity, written whole (the adapter's and the optimizer moments' shards gathered as the adapter file's
are), so a run resumes at any tensor-parallel size. Every rank takes part in gathering; rank 0 alone
writes, to a temporary file renamed into place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glm.adapters.methods import Method
from glm.distributed import is_main
from glm.model import GLM

STATE_FILE = "finetune_state.pt"


def _names(model: GLM, params: list[Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]  # the adapter keys: `NAME.lora_A`, `NAME.key`, ...


def whole_optimizer_state(
    optimizer: torch.optim.Optimizer, model: GLM, params: list[Tensor], method: Method
) -> dict[str, Any]:
    """The optimizer's state dict with each parameter's state keyed by its adapter key and its moments
    whole, on the CPU (a collective under tensor parallelism)."""
    saved = optimizer.state_dict()
    names, gather = _names(model, params), method.whole(model)
    state = {}
    for index, values in sorted(saved["state"].items()):
        key = names[index]
        state[key] = {
            k: gather(key, v.detach().float()).cpu() if torch.is_tensor(v) and v.dim() else v
            for k, v in values.items()
        }
    return {"param_groups": saved["param_groups"], "state": state}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: GLM, params: list[Tensor], method: Method, saved: dict
) -> None:
    """Load what `whole_optimizer_state` returned, each rank taking its part."""
    names, split = _names(model, params), method.part(model)
    index = {key: i for i, key in enumerate(names)}
    state = {}
    for key, values in saved["state"].items():
        if isinstance(key, int):  # a state written before states were whole: one process's, as it is
            state[key] = values
            continue
        if key not in index:
            raise ValueError(f"the saved optimizer state holds {key}, which this model's adapter lacks")
        state[index[key]] = {
            k: split(key, v) if torch.is_tensor(v) and v.dim() else v for k, v in values.items()
        }
    optimizer.load_state_dict({"param_groups": saved["param_groups"], "state": state})


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Rank 0 writes `state` to `path` through a temporary file renamed into place; other ranks return."""
    if not is_main():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_state(path: Path) -> dict[str, Any] | None:
    """The state in `path` (read by every rank), or None when there is none."""
    return torch.load(path, weights_only=True) if path.exists() else None
