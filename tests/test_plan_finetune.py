"""The fine-tuning planner (glm/plan_finetune.py) against counts made by hand from the model's shapes."""

from __future__ import annotations

import pytest
import torch

from glm.adapters.lora import LoRAOptions
from glm.adapters.prefix import PrefixOptions
from glm.checkpoint import read_metadata
from glm.config import GLMConfig, get_preset
from glm.plan_finetune import hardware_rows, plan_finetune
from glm.run_config import DEFAULT_MODEL

ATTENTION = ("attention.query_key_value", "attention.dense")


@pytest.fixture(scope="module")
def bundled() -> GLMConfig:
    return GLMConfig.from_dict(read_metadata(DEFAULT_MODEL)["model"])


def parameters(c: GLMConfig) -> int:
    """Every stored parameter, counted from the architecture (glm/model.py)."""
    h, f = c.hidden_size, c.inner_hidden_size
    layer = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (2 * f * h + 2 * f) + (f * h + h)
    return c.vocab_size * h + c.num_layers * layer + 2 * h


def lora_parameters(c: GLMConfig, rank: int, targets: tuple[str, ...]) -> int:
    """sum of r (in + out) over the adapted layers of every block."""
    h, f = c.hidden_size, c.inner_hidden_size
    shapes = {
        "attention.query_key_value": (h, 3 * h),
        "attention.dense": (h, h),
        "mlp.dense_h_to_4h": (h, 2 * f),
        "mlp.dense_4h_to_h": (f, h),
    }
    return c.num_layers * sum(rank * sum(shapes[t]) for t in targets)


@pytest.mark.parametrize("targets", [ATTENTION, ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")])
def test_the_bundled_models_figures_are_the_hand_counts(bundled, targets):
    plan = plan_finetune(bundled, LoRAOptions(4, 8.0, 0.0, targets), dtype=torch.float32, device_type="cpu")
    assert plan.weights == 4 * parameters(bundled)  # fp32: 4 bytes a parameter
    adapter = 4 * lora_parameters(bundled, 4, targets)  # fp32 adapter
    assert plan.adapter == adapter and plan.gradients == adapter  # one fp32 gradient per parameter
    assert plan.optimizer == 2 * adapter  # AdamW: two fp32 moments per parameter
    assert plan.workspace == 0  # no CUDA workspace on the CPU
    checkpointed = plan_finetune(
        bundled, LoRAOptions(4, 8.0, 0.0, targets), dtype=torch.float32, device_type="cpu", checkpointing=True
    )
    assert 0 < checkpointed.activations < plan.activations  # checkpointing keeps less
    fp16 = plan_finetune(bundled, LoRAOptions(4, 8.0, 0.0, targets), dtype=torch.float16, device_type="cpu")
    assert fp16.weights == 2 * parameters(bundled) and fp16.adapter == adapter  # the adapter stays fp32


def test_glm_130b_int4_on_four_gpus_is_sane():
    config = get_preset("glm-130b")
    h, f, n = config.hidden_size, config.inner_hidden_size, 4
    plan = plan_finetune(config, LoRAOptions(8, 16.0, 0.0, ATTENTION), n, 4, torch.float16, "cuda", 1, 512)
    # Under tensor parallelism qkv (column-parallel) keeps all of A [r, h] and its rows of B [3h / n, r];
    # dense (row-parallel) its columns of A [r, h / n] and all of B [h, r].
    assert plan.adapter == 4 * config.num_layers * 8 * (h + 3 * h // n + h // n + h)
    # INT4 linear weights (half a byte each) split 4 ways, plus the fp16 embedding shard: a lower bound; the
    # scales and LayerNorms add well under 10 %.
    linear = config.num_layers * (3 * h * h + h * h + 2 * f * h + f * h)
    floor = linear // 2 // n + 2 * config.vocab_size * h // n
    assert floor <= plan.weights < 1.1 * floor
    assert plan.activations > 0
    rows = hardware_rows(config, LoRAOptions(8, 16.0, 0.0, ATTENTION), 512)
    assert any(r.startswith("| 4 x RTX 3090 | INT4 |") for r in rows)


def prefix_parameters(c: GLMConfig, length: int, tensor_parallel_size: int = 1) -> int:
    """A key and a value [N, nh, hn] every layer, the heads split across the ranks: 2 L N h / TP."""
    return 2 * c.num_layers * length * c.hidden_size // tensor_parallel_size


def test_the_p_tuning_rows_are_the_hand_counts(bundled):
    plan = plan_finetune(bundled, PrefixOptions(16), dtype=torch.float32, device_type="cpu")
    assert plan.weights == 4 * parameters(bundled)  # the same frozen base as LoRA's
    adapter = 4 * prefix_parameters(bundled, 16)  # fp32 prefix
    assert plan.adapter == adapter and plan.gradients == adapter and plan.optimizer == 2 * adapter
    checkpointed = plan_finetune(
        bundled, PrefixOptions(16), dtype=torch.float32, device_type="cpu", checkpointing=True
    )
    assert 0 < checkpointed.activations < plan.activations
    config = get_preset("glm-130b")
    sharded = plan_finetune(config, PrefixOptions(16), 4, 4, torch.float16, "cuda", 1, 512)
    assert sharded.adapter == 4 * prefix_parameters(config, 16, 4)  # each rank keeps its heads' prefix
    assert sharded.activations > 0
    rows = hardware_rows(config, PrefixOptions(16), 512)
    assert any(r.startswith("| 4 x RTX 3090 | INT4 | P-tuning v2, N=16 |") for r in rows)
