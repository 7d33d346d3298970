"""tools/convert_tp.py: re-sharding keeps the model's outputs and follows the split rules."""

from __future__ import annotations

import torch

from glm.loading import load_model
from glm.sharding import split_tensor
from tests.conftest import SAT_TINY
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
    assert convert_tp(["--input-folder", source, "--output-folder", str(out), "--config", "glm-130b"]) == 2
    assert "missing key 'transformer.layers.10." in capsys.readouterr().err  # a 70-layer config
    assert list(tmp_path.iterdir()) == []
