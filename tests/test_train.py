"""The pre-training script: deterministic batches, packing within rows, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glm.loading import load_model
from glm.train import TokenStream, TrainConfig, batch_for_step, build_parser, main, special_ids

ENGLISH = "The river runs through the old town.\nIt passes the market square.\n\nRain fell all night.\n"
CHINESE = "春天来了，花园里的花都开了。\n孩子们在听故事。\n\n下了一整夜的雨。\n"


def write_corpus(root: Path) -> list[Path]:
    folders = []
    for lang, text in (("en", ENGLISH), ("zh", CHINESE)):
        folder = root / lang
        folder.mkdir(parents=True)
        for split in ("train", "valid"):
            (folder / f"{split}.txt").write_text("\n".join([text] * 20))  # documents apart
        folders.append(folder)
    return folders


def test_windows_start_at_paragraphs_and_stay_in_their_document(tiny_checkpoint, tmp_path):
    _, tok = load_model(tiny_checkpoint)
    (folder,) = write_corpus(tmp_path)[:1]
    stream = TokenStream.from_file(folder / "train.txt", tok)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids, complete = stream.window(1000, generator)
        text = tok.detokenize(ids)
        assert text in {
            "The river runs through the old town.\nIt passes the market square.",
            "It passes the market square.",
            "Rain fell all night.",
        }
        assert complete


def test_batches_are_deterministic_and_packed_within_rows(tiny_checkpoint, tmp_path):
    _, tok = load_model(tiny_checkpoint)
    streams = [TokenStream.from_file(f / "train.txt", tok) for f in write_corpus(tmp_path)]
    cfg = TrainConfig(batch_size=3, row_length=48, max_text_tokens=40)
    weights, ids = torch.ones(2), special_ids(tok)
    first, again = (batch_for_step(streams, weights, 7, cfg, ids) for _ in range(2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["tokens"].shape == (3, 48)
    other = batch_for_step(streams, weights, 8, cfg, ids)
    assert not torch.equal(first["tokens"], other["tokens"])
    assert (first["labels"] != -100).sum() > 0


def test_resumed_run_equals_an_uninterrupted_one(tiny_checkpoint, tmp_path):
    _, tok = load_model(tiny_checkpoint)
    folders = [str(f) for f in write_corpus(tmp_path / "corpus")]
    config = tmp_path / "model.json"
    config.write_text(
        json.dumps(
            dict(
                num_layers=1,
                hidden_size=32,
                num_attention_heads=2,
                inner_hidden_size=64,
                vocab_size=640,
                max_sequence_length=128,
            )
        )
    )

    def run(output: str, extra: list[str]) -> None:
        argv = [
            "--data",
            *folders,
            "--tokenizer",
            str(tok.model_file),
            "--model-config",
            str(config),
            "--output",
            str(tmp_path / output),
            "--batch-size",
            "2",
            "--warmup",
            "2",
            "--eval-every",
            "2",
            "--no-bf16",
        ]
        main(build_parser().parse_args(argv + extra))

    run("straight", ["--steps", "4"])
    run("resumed", ["--steps", "4", "--stop-after", "2"])  # interrupted after 2 steps
    run("resumed", ["--export", str(tmp_path / "model")])  # picks up its own config and goes on
    straight = torch.load(tmp_path / "straight" / "train_state.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)["model"]
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=0, rtol=0)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "valid_loss" in log[1]
    model, exported_tok = load_model(tmp_path / "model")  # the export loads with no flags
    assert model.config.hidden_size == 32 and exported_tok.vocab_size == tok.vocab_size
