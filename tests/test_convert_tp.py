"""tools/convert_tp.py: re-sharding keeps the model's outputs and follows the split rules."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tolerance import assert_model_close

from glm.checkpoint import load_state_dict, save_checkpoint
from glm.config import get_preset
from glm.loading import load_model
from glm.model import GLM
from glm.sharding import Split, split_rule, split_tensor
from tests.conftest import SAT_TINY
from tools.convert_tp import convert
from tools.convert_tp import main as convert_tp


def logits(model, reference):
    with torch.no_grad():
        return model(reference["tokens"], reference["position_ids"], reference["attention_mask"])


def test_original_checkpoint_round_trips_through_2_4_and_1_shards(sat_tiny, reference, tmp_path):
    expected = logits(sat_tiny, reference)
    source = SAT_TINY / "ckpt"
    assert (
        convert_tp(
            [
                "--input-folder",
                str(source),
                "--output-folder",
                str(tmp_path / "tp2"),
                "--target-tp",
                "2",
                "--config",
                "sat-tiny",
            ]
        )
        == 0
    )
    assert (
        convert_tp(
            [
                "--input-folder",
                str(tmp_path / "tp2"),
                "--output-folder",
                str(tmp_path / "tp4"),
                "--target-tp",
                "4",
            ]
        )
        == 0
    )
    assert (
        convert_tp(
            [
                "--input-folder",
                str(tmp_path / "tp4"),
                "--output-folder",
                str(tmp_path / "tp1"),
                "--target-tp",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "tp4" / "latest").read_text() == "1"  # the source's iteration tag is kept
    for name in ("tp2", "tp4", "tp1"):
        model, _ = load_model(tmp_path / name)
        torch.testing.assert_close(logits(model, reference), expected, atol=0, rtol=0)
    key = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    rank3 = torch.load(tmp_path / "tp4" / "1" / "mp_rank_03_model_states.pt", weights_only=True)["module"]
    torch.testing.assert_close(
        rank3[key], split_tensor(key, sat_tiny.state_dict()[key], 4)[3], atol=0, rtol=0
    )


def test_conversion_errors_exit_2_and_write_nothing(tmp_path, capsys):
    source = str(SAT_TINY / "ckpt")
    out = tmp_path / "out"
    assert convert_tp(["--input-folder", source, "--output-folder", str(out), "--target-tp", "2"]) == 2
    assert "--config" in capsys.readouterr().err  # no model_config.json: the config is needed
    assert (
        convert_tp(
            [
                "--input-folder",
                source,
                "--output-folder",
                str(out),
                "--target-tp",
                "3",
                "--config",
                "sat-tiny",
            ]
        )
        == 2
    )
    assert "must divide the 4 attention heads" in capsys.readouterr().err
    glm_130b = [
        "--input-folder",
        source,
        "--output-folder",
        str(out),
        "--target-tp",
        "4",
        "--config",
        "glm-130b",
    ]
    assert convert_tp(glm_130b) == 2
    assert "missing keys transformer.layers.2." in capsys.readouterr().err  # a 70-layer config
    assert list(tmp_path.iterdir()) == []


def test_target_tp_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_tp(["--input-folder", str(SAT_TINY / "ckpt"), "--output-folder", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "--target-tp" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("mp_rank_*_model_states.pt"))


def _tensor_bytes(folder: Path) -> int:
    state_dict, _ = load_state_dict(folder)
    return sum(t.numel() * t.element_size() for t in state_dict.values())


@pytest.mark.parametrize(("source_tp", "target_tp"), [(1, 4), (4, 2), (2, 4), (4, 1)])
def test_each_input_byte_is_read_about_once(sat_tiny, tmp_path, source_tp, target_tp):
    source = save_checkpoint(sat_tiny.state_dict(), tmp_path / "in", sat_tiny.config, None, source_tp)
    out, read = convert(source, tmp_path / "out", target_tp)
    model_bytes = _tensor_bytes(source)
    # Replicated LayerNorms and biases are read once per output rank; everything else exactly once.
    with torch.device("meta"):
        plain = GLM(sat_tiny.config)
    replicated = sum(
        t.numel() * 4 for k, t in plain.state_dict().items() if split_rule(k) is Split.REPLICATED
    )
    assert read == model_bytes + (target_tp - 1) * replicated
    assert read <= 1.01 * model_bytes * (1 if target_tp == 1 else 1.02)
    # Each output file holds its shard only, not the source storages its slices were views of.
    assert _file_bytes(out) < 1.1 * model_bytes + target_tp * (replicated + 20_000)
    merged, size = load_state_dict(out)
    assert size == target_tp
    for key, tensor in sat_tiny.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, atol=0, rtol=0)


def test_sigterm_removes_the_partial_output_and_a_rerun_removes_stale_temp_folders(sat_tiny, tmp_path):
    source = save_checkpoint(sat_tiny.state_dict(), tmp_path / "in", sat_tiny.config, None, 1)
    out = tmp_path / "out"
    # A killed run (SIGKILL cannot be caught) leaves its temporary folder with the dead writer's pid.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.abc123"
    (stale / "release").mkdir(parents=True)
    (stale / ".writing-pid").write_text(str(dead.pid))
    unrelated = tmp_path / ".out.notours"
    unrelated.mkdir()
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        import glm.checkpoint as checkpoint
        save = checkpoint.torch.save
        def save_then_sigterm(*args, **kwargs):  # SIGTERM arrives while the first shard is written
            save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
        checkpoint.torch.save = save_then_sigterm
        from tools.convert_tp import main
        args = ["--input-folder", {str(source)!r}, "--output-folder", {str(out)!r}, "--target-tp", "2"]
        sys.exit(main(args))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "removed" in result.stderr and ".out.abc123" in result.stderr
    assert "interrupted: nothing was written" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.notours", "in"]


def test_output_files_get_the_umask_mode(sat_tiny, tmp_path):
    source = save_checkpoint(sat_tiny.state_dict(), tmp_path / "in", sat_tiny.config, None, 1)
    old = os.umask(0o022)
    try:
        out, _ = convert(source, tmp_path / "out", 2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_loads_without_flags_as_quantize_while_loading(reference, tmp_path, bits):
    from glm.quantize import quantization_transform
    from glm.quantized_checkpoint import checkpoint_transform

    source = SAT_TINY / "ckpt"
    out = tmp_path / f"int{bits}"
    args = ["--input-folder", str(source), "--output-folder", str(out), "--config", "sat-tiny"]
    assert convert_tp([*args, "--target-tp", "2", "--quantization-bit-width", str(bits)]) == 0
    # No flags: the metadata names the quantization (glm.load and the command lines do this).
    stored, _ = load_model(out, transforms=[checkpoint_transform(out)])
    assert type(stored.transformer.layers[0].mlp.dense_4h_to_h).__name__ == "QuantizedLinear"
    # The same TP-2 slices quantized while loading, at TP 1 the row-parallel shards keep their own scales:
    # so compare against converting at TP 1 the checkpoint that convert_tp wrote at TP 2, and against
    # quantizing while loading (which sees whole rows) only up to quantization error.
    again = tmp_path / "again"
    assert convert_tp(["--input-folder", str(out), "--output-folder", str(again), "--target-tp", "1"]) == 0
    resharded, _ = load_model(again, transforms=[checkpoint_transform(again)])
    assert_model_close(logits(resharded, reference), logits(stored, reference), resharded.config)
    config = get_preset("sat-tiny")
    on_load, _ = load_model(source, config=config, transforms=[quantization_transform(bits)])
    exact, _ = load_model(source, config=config)

    def error(model):
        return (
            (logits(model, reference) - logits(exact, reference)).norm() / logits(exact, reference).norm()
        ).item()

    # Finer (per-shard) scales in the row-parallel layers: a different rounding, and no larger an error.
    assert not torch.equal(logits(on_load, reference), logits(stored, reference))
    assert error(stored) < 1.5 * error(on_load)
