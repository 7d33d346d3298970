"""LoRA fine-tuning: the training layout is generation's and the evaluator's, a zero adapter is the base,
training lowers the loss, a saved / reloaded / merged adapter gives the live adapter's logits, resume and
gradient accumulation are exact, and bad input is a one-line error with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm.adapters.files import attach_adapter, base_identity, read_adapter, save_adapter
from glm.adapters.lora import LoRALinear, LoRAOptions, apply_lora, full_state_dict
from glm.checkpoint import load_state_dict, save_checkpoint
from glm.cli.finetune import FinetuneConfig
from glm.decoding.infill import prepare_query
from glm.finetune import cli
from glm.finetune.data import Prompt, prompt_example
from glm.finetune.loop import batch_of, evaluate, train
from glm.finetune.merge import merge_adapter
from glm.loading import load_model
from glm.objective import attention_mask
from glm.quantize import quantization_transform
from glm.query import build_inputs
from glm.scoring import choice_row

PROMPTS = [
    ("The river runs through the old [MASK].", " town"),
    ("It passes the market", " square and the church."),
    ("春天来了，[MASK]都开了。", "花园里的花"),
    ("Rain fell all", " night long."),
]


def examples(tok):
    return [prompt_example(Prompt(p, c, f"test:{i}"), tok) for i, (p, c) in enumerate(PROMPTS, start=1)]


def ids_of(tok):
    return tok.sop_id, tok.eop_id, tok.pad_id


def logits(model, tok):
    batch = batch_of(examples(tok), *ids_of(tok))
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"]).float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    return float((a - b).abs().max() / b.abs().max())


def quick(**overrides) -> FinetuneConfig:
    values = dict(steps=12, batch_size=4, lr=3e-2, warmup=1, dropout=0.0, eval_every=100, save_every=100)
    values["targets"] = (
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    return FinetuneConfig(**{**values, **overrides})


@pytest.mark.parametrize("prompt", ["The river [MASK] through the town.", "The river runs through"])
def test_a_training_sample_is_laid_out_as_generation_lays_it_out(tiny_checkpoint, prompt):
    _, tok = load_model(tiny_checkpoint)
    example = prompt_example(Prompt(prompt, " fast water", "t:1"), tok)
    query = prepare_query(prompt, tok)
    assert example.context == query.ids
    sample = example.sample(tok.sop_id, tok.eop_id)
    n = len(query.ids) + 1  # the context generation starts from, sop included
    # generation feeds sop then each blank token but the last; their positions and mask must agree
    generated = len(example.blank)
    inputs = build_inputs([[*query.ids, tok.sop_id]], generated, [example.mask_position])
    length = n + generated
    assert sample.tokens[:n] == [*query.ids, tok.sop_id]
    assert sample.positions[:length] == inputs.position_ids[0, :length].tolist()
    assert torch.equal(
        attention_mask(sample, len(sample.tokens))[:length, :length], inputs.attention_mask[0, 0]
    )
    assert sample.labels[n - 1 :] == [*example.blank, tok.eop_id]


def test_a_training_sample_is_the_evaluators_choice_row(tiny_checkpoint):
    _, tok = load_model(tiny_checkpoint)
    example = prompt_example(Prompt("The river [MASK] through the town.", " runs", "t:1"), tok)
    row = choice_row(example.context, [example.blank], example.mask_position, sop_id=tok.sop_id)
    sample = example.sample(tok.sop_id, tok.eop_id)
    assert sample.tokens[:-1] == row.tokens and sample.positions[:-1] == row.position_ids
    assert (~attention_mask(sample, len(sample.tokens))[:-1, :-1] == row.visible()).all()


def test_a_zero_adapter_gives_exactly_the_base_logits(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint)
    base = logits(model, tok)
    apply_lora(model, LoRAOptions(rank=4, targets=("attention.query_key_value", "mlp.dense_4h_to_h")))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * model.config.num_layers
    assert torch.equal(logits(model, tok), base)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_training_lowers_the_loss_and_the_adapter_round_trips(tiny_checkpoint, tmp_path):
    model, tok = load_model(tiny_checkpoint)
    data = examples(tok)
    cfg = quick()
    before = evaluate(model, data, cfg, ids_of(tok))
    identity = base_identity(tiny_checkpoint, model.config)
    records = train(model, data, cfg, tmp_path / "run", ids_of(tok), identity, data, quiet=True)
    after = evaluate(model, data, cfg, ids_of(tok))
    assert after < before - 1.0, (before, after)  # nats per blank token
    assert records[-1]["loss"] < records[0]["loss"]
    live = logits(model, tok)
    assert relative_error(live, logits(load_model(tiny_checkpoint)[0], tok)) > 1e-3  # it changed something

    folder = save_adapter(tmp_path / "adapter", model, identity)
    reloaded = attach_adapter(load_model(tiny_checkpoint)[0], folder, tiny_checkpoint)
    assert relative_error(logits(reloaded, tok), live) < 1e-5

    merge_adapter(str(tiny_checkpoint), str(folder), str(tmp_path / "merged"), dtype="float32")
    merged, merged_tok = load_model(tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert relative_error(logits(merged, merged_tok), live) < 1e-5
    base_state, _ = load_state_dict(tiny_checkpoint)
    merged_state, _ = load_state_dict(tmp_path / "merged")
    assert set(merged_state) == set(base_state)  # the original layout, same keys
    assert torch.equal(
        merged_state["transformer.word_embeddings.weight"].half(),
        base_state["transformer.word_embeddings.weight"],
    )


def test_an_adapter_for_another_base_is_refused(tiny_checkpoint, tmp_path):
    model, tok = load_model(tiny_checkpoint)
    apply_lora(model, LoRAOptions(rank=2))
    folder = save_adapter(tmp_path / "adapter", model, base_identity(tiny_checkpoint, model.config))
    state, _ = load_state_dict(tiny_checkpoint)
    state["transformer.final_layernorm.weight"] = state["transformer.final_layernorm.weight"] * 2
    other = save_checkpoint(state, tmp_path / "other", model.config, tok)
    with pytest.raises(ValueError, match="trained on another base model"):
        attach_adapter(load_model(other)[0], folder, other)
    with pytest.raises(ValueError, match="trained on another base model"):
        merge_adapter(str(other), str(folder), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_checkpoint, tmp_path):
    tok = load_model(tiny_checkpoint)[1]
    cfg = quick(steps=4, batch_size=3, dropout=0.1)  # 4 examples in batches of 3: epochs interleave
    finals = []
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        for stop in stops:
            model = load_model(tiny_checkpoint)[0]
            train(model, examples(tok), cfg, tmp_path / name, ids_of(tok), "id", stop_after=stop, quiet=True)
        finals.append(full_state_dict(model))
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=1e-6, atol=0)


def test_gradient_accumulation_and_checkpointing_give_the_same_step(tiny_checkpoint, tmp_path):
    tok = load_model(tiny_checkpoint)[1]
    runs = {
        "one batch": quick(steps=1, batch_size=4),
        "accumulated": quick(steps=1, batch_size=2, grad_accum=2),
        "checkpointed": quick(steps=1, batch_size=4, gradient_checkpointing=True),
    }
    finals = {}
    for name, cfg in runs.items():
        model = load_model(tiny_checkpoint)[0]
        train(model, examples(tok), cfg, tmp_path / name, ids_of(tok), "id", quiet=True)
        finals[name] = full_state_dict(model)
    # Adam's first step moves each parameter by about lr whatever its gradient's size, so the steps are
    # compared on that scale: to 0.1 % of the step size.
    step_size = runs["one batch"].lr
    for name in ("accumulated", "checkpointed"):
        for key, value in finals["one batch"].items():
            torch.testing.assert_close(finals[name][key], value, rtol=0, atol=1e-3 * step_size)


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_trains_over_a_quantized_base(tiny_checkpoint, tmp_path, bits):
    model, tok = load_model(tiny_checkpoint, transforms=[quantization_transform(bits)])
    base = logits(model, tok)
    apply_lora(model, LoRAOptions(rank=4))
    assert torch.equal(logits(model, tok), base)  # the quantized layers are wrapped, not replaced
    model, _ = load_model(tiny_checkpoint, transforms=[quantization_transform(bits)])
    cfg = quick()
    before = evaluate(model, examples(tok), cfg, ids_of(tok))
    train(model, examples(tok), cfg, tmp_path, ids_of(tok), "id", quiet=True)
    assert evaluate(model, examples(tok), cfg, ids_of(tok)) < before - 1.0
    assert all(b.dtype == torch.int8 for n, b in model.named_buffers() if n.endswith(".weight"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_command_line_trains_resumes_and_the_adapter_loads_with_adapter(tiny_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PROMPTS])
    run = tmp_path / "run"
    common = ["--checkpoint", tiny_checkpoint, "--data", data, "--eval-data", data, "--output", run]
    common += ["--steps", "3", "--batch-size", "2", "--rank", "2", "--device", "cpu"]
    for extra in (["--stop-after", "2"], []):
        with pytest.raises(SystemExit) as exit_:
            cli([str(a) for a in [*common, *extra]])
        assert exit_.value.code == 0
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and "eval_loss" in lines[-1]
    meta, tensors = read_adapter(run / "adapter")
    assert meta["options"]["rank"] == 2 and meta["training"]["steps"] == 3
    assert set(tensors) == {
        f"transformer.layers.{i}.attention.{m}.lora_{w}"
        for i in range(2)
        for m in ("query_key_value", "dense")
        for w in "AB"
    }

    from glm.api import load_from_args
    from glm.cli.generate import build_parser

    args = build_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--adapter", str(run / "adapter"), "--device", "cpu"]
    )
    model, tok = load_from_args(args)
    live = load_model(tiny_checkpoint)[0]
    attach_adapter(live, run / "adapter", tiny_checkpoint)
    assert torch.equal(logits(model, tok), logits(live, tok))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "train.jsonl:2: malformed JSON"),
        ('{"prompt": "a"}', "train.jsonl:2: 'completion' must be a non-empty string"),
        ('["a", "b"]', 'train.jsonl:2: each line needs {"prompt": str, "completion": str}'),
    ],
)
def test_a_bad_line_is_one_line_error_and_nothing_is_written(
    tiny_checkpoint, tmp_path, capsys, line, message
):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(SystemExit) as exit_:
        cli(["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_task_yaml_trains_on_the_correct_choice(tiny_checkpoint, tmp_path):
    from glm.evaluation.dataset import multiple_choice_samples
    from glm.finetune.data import task_examples

    folder = tmp_path / "task"
    folder.mkdir()
    items = [
        {"inputs_pretokenized": "The river runs", "choices_pretokenized": ["up", "through town"], "label": 1}
    ]
    write_jsonl(folder / "train.jsonl", items)
    yaml = tmp_path / "task.yaml"
    yaml.write_text(f"name: t\ntype: mul\npath: {folder}\nfile_pattern:\n  train: train.jsonl\n")
    model, tok = load_model(tiny_checkpoint)
    (example,) = task_examples(yaml, folder / "train.jsonl", model, tok, "/")
    (sample,) = multiple_choice_samples(items, tok, 2048, use_task_mask=False)
    assert example.context == sample.context and example.blank == sample.choices[1]
    assert example.mask_position == sample.mask_position
