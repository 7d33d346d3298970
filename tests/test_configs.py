"""configs/*.yaml run configs: the original's four GLM-130B configs and the bundled model; strict keys."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from glm.api import DEFAULT_MODEL
from glm.config import get_preset
from glm.run_config import RunConfig, apply_run_config, load_run_config, presets

REPO = Path(__file__).resolve().parent.parent


def test_the_original_configs_as_presets():
    # configs/model_glm_130b*.sh: MP_SIZE and the extra flags of each.
    want = {
        "glm-130b": (8, None, None),
        "glm-130b-int8": (8, 8, None),
        "glm-130b-int4": (4, 4, None),
        "glm-130b-v100": (8, None, "25GiB"),
    }
    for name, (tp, bits, max_memory) in want.items():
        run = load_run_config(name)
        assert run.model == get_preset("glm-130b")
        assert (run.tensor_parallel_size, run.quantization_bit_width, run.max_memory) == (
            tp,
            bits,
            max_memory,
        )
        assert run.tokenizer_type == "icetk" and run.dtype == "float16"
    assert set(want) | {"glm-bilingual"} <= set(presets())


def test_bundled_config_points_at_the_bundled_model():
    run = load_run_config("glm-bilingual")
    assert Path(run.checkpoint) == DEFAULT_MODEL and run.model is None


def test_a_model_preset_and_a_model_json_still_work(tmp_path):
    assert load_run_config("sat-tiny") == RunConfig(model=get_preset("sat-tiny"))
    path = tmp_path / "shape.json"
    path.write_text(
        '{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "inner_hidden_size": 96, '
        '"vocab_size": 100}'
    )
    assert load_run_config(path).model.hidden_size == 64


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "tensor_paralel_size: 2\n",
            "unknown run config key 'tensor_paralel_size'; did you mean 'tensor_parallel_size'",
        ),
        ("max-memroy: 2GiB\n", "did you mean 'max_memory'"),
        ("model: {num_layer: 2}\n", "unknown model config key 'num_layer'; did you mean 'num_layers'"),
        ("quantization_bit_width: 3\n", "must be 4 or 8"),
        ("max_memory: plenty\n", "not a size"),
        ("model: glm-13b\n", "unknown model preset 'glm-13b'"),
        ("[1, 2]\n", "a mapping"),
    ],
)
def test_bad_keys_and_values_are_errors_naming_the_fix(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_run_config(path)


def test_unknown_preset_names_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'glm-130b-int4'"):
        load_run_config("glm-130b-in4")


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("checkpoint: ../ckpt\n")
    assert load_run_config(path).checkpoint == str(tmp_path / "ckpt")


def test_flags_given_win_over_the_config():
    args = argparse.Namespace(
        config="glm-130b-int4", tensor_parallel_size=None, max_memory="3GiB", dtype=None
    )
    run = apply_run_config(args)
    assert (args.tensor_parallel_size, args.max_memory, args.dtype) == (4, "3GiB", "float16")
    assert run.quantization_bit_width == 4


def test_a_config_checkpoint_replaces_the_default_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint: /data/glm-130b\n")
    args = argparse.Namespace(config=str(path), checkpoint=str(DEFAULT_MODEL))
    apply_run_config(args)
    assert args.checkpoint == "/data/glm-130b"
    args = argparse.Namespace(config=str(path), checkpoint="/mine")
    apply_run_config(args)
    assert args.checkpoint == "/mine"


def test_shell_scripts_can_read_one_key():
    out = subprocess.run(
        [sys.executable, "-m", "glm.run_config", "glm-130b-int4", "tensor_parallel_size"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "4\n"
