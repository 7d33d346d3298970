"""P-tuning v2 (glm/adapters/prefix.py): every position attends to the prefix, generation through the KV
cache equals a full forward with the prefix, a padded batch gives each row its own logits, training moves
only the prefix and lowers the loss, a saved / reloaded adapter gives the live one's logits, and --merge
refuses a prefix with one line, writing nothing."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune import PROMPTS, examples, ids_of, logits, quick, relative_error, write_jsonl
from tolerance import assert_model_close

from glm.adapters.files import attach_adapter, base_identity, read_adapter, save_adapter
from glm.adapters.prefix import Prefix, PrefixOptions, apply_prefix
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.finetune import cli
from glm.finetune.loop import batch_of, evaluate, train
from glm.loading import load_model
from glm.model import apply_rotary, rotary_tables
from glm.query import build_inputs


class Recording(BaseStrategy):
    """Greedy decoding that keeps the logits it was given."""

    def __init__(self) -> None:
        super().__init__(1, top_k=1)
        self.logits = []

    def forward(self, logits, tokens, context_lengths=None):
        self.logits.append(logits.clone())
        return super().forward(logits, tokens, context_lengths)


def prefixed(checkpoint, length=5, seed=3, noise=0.0):
    """A model with a prefix, initialised for `seed` and, with `noise`, moved by that much Gaussian noise (as
    training would move it: the untrained tiny model's own keys and values change its output but little)."""
    model, tok = load_model(checkpoint)
    apply_prefix(model, PrefixOptions(length), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for m in model.modules() if isinstance(m, Prefix) for p in (m.key, m.value)):
            p.add_(noise * torch.randn(p.shape, generator=generator))
    return model, tok


def test_every_position_attends_to_the_prefix_as_written_out_by_hand(tiny_checkpoint):
    """The first layer's attention output, recomputed from the formula: softmax(q [Pk; k]^T / sqrt(hn))
    [Pv; v], the prefix visible to every row, the tokens' own mask unchanged, rotary on the tokens only."""
    model, _ = prefixed(tiny_checkpoint, noise=1.0)
    block = model.transformer.layers[0]
    attention, prefix = block.attention, block.prefix
    context, n = [5, 17, 250, 33], 7
    inputs = build_inputs([context], n - len(context) + 1, [None])  # bidirectional context, causal after
    tokens = torch.tensor([[*context, 80, 9, 7]])
    positions, mask = inputs.position_ids[:, :n], inputs.attention_mask[:, :, :n, :n]
    assert mask.any()  # some rows do not see every token: the tokens' own mask is tested too
    captured = {}
    handle = attention.register_forward_hook(lambda m, a, out: captured.update(out=out, x=a[0]))
    with torch.no_grad():
        model(tokens[:, :n], positions, mask)
        handle.remove()
        x = captured["x"]  # the block's normalised input
        nh, hn = attention.num_heads, attention.head_dim
        qkv = attention.query_key_value(x).view(1, n, nh, 3, hn)
        config = model.config
        cos, sin = rotary_tables(positions, hn, config.rotary_base, config.rotary_fp16_tables, x.dtype)
        q, k = apply_rotary(qkv[:, :, :, 0], cos, sin), apply_rotary(qkv[:, :, :, 1], cos, sin)
        keys = torch.cat([prefix.key[None], k], 1).transpose(1, 2)  # [1, nh, P + n, hn]
        values = torch.cat([prefix.value[None], qkv[:, :, :, 2]], 1).transpose(1, 2)
        scores = q.transpose(1, 2) @ keys.transpose(-1, -2) / hn**0.5  # [1, nh, n, P + n]
        visible = torch.cat([torch.ones(1, 1, n, prefix.length, dtype=torch.bool), ~mask], -1)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        expected = attention.dense((weights @ values).transpose(1, 2).reshape(1, n, nh * hn))
    assert_model_close(captured["out"], expected, model.config)
    assert weights[..., : prefix.length].sum(-1).min() > 1e-3  # the prefix carries weight in every row


def test_cached_generation_equals_a_full_forward_with_the_prefix(tiny_checkpoint):
    model, _ = prefixed(tiny_checkpoint, noise=1.0)
    context = [5, 17, 250, 33, 80, 9, 599]  # any ids; the last stands for sop
    strategy = Recording()
    ((output,),) = generate(model, [context], strategy, max_gen_length=6)
    generated = output[len(context) :]
    n = len(output) - 1  # the last token was never fed back
    full = build_inputs([context], n - len(context) + 1, [None])
    with torch.no_grad():  # no cache: every position recomputed, the prefix in front of every layer's keys
        expected = model(
            torch.tensor([output[:n]]), full.position_ids[:, :n], full.attention_mask[:, :, :n, :n]
        )
    expected = expected[0, len(context) - 1 :]  # the logits that predicted each generated token
    assert_model_close(torch.cat([s[0] for s in strategy.logits]), expected, model.config)
    assert expected.argmax(-1).tolist() == generated
    base = load_model(tiny_checkpoint)[0]
    with torch.no_grad():
        base_logits = base(
            torch.tensor([output[:n]]), full.position_ids[:, :n], full.attention_mask[:, :, :n, :n]
        )
    assert relative_error(expected, base_logits[0, len(context) - 1 :]) > 1e-2  # the prefix does something


def test_a_padded_batch_gives_each_row_its_own_logits(tiny_checkpoint):
    model, tok = prefixed(tiny_checkpoint, noise=1.0)
    batch = logits(model, tok)  # right-padded rows of different lengths
    for row, example in enumerate(examples(tok)):
        single = batch_of([example], *ids_of(tok))
        with torch.no_grad():
            own = model(single["tokens"], single["position_ids"], single["attention_mask"])
        length = single["tokens"].shape[1]
        assert_model_close(batch[row, :length], own[0], model.config)


def test_training_moves_only_the_prefix_and_lowers_the_loss(tiny_checkpoint, tmp_path):
    model, tok = load_model(tiny_checkpoint)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    # The tiny model is untrained (weights of std 0.02): a prefix moves its output slowly, so a large step
    cfg = quick(method="ptuning", prefix_length=4, steps=10, lr=1.0)
    train(model, examples(tok), cfg, tmp_path / "run", ids_of(tok), "id", quiet=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.layers.{i}.prefix.{w}" for i in range(2) for w in ("key", "value")}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the base is untouched
    fresh = prefixed(tiny_checkpoint, length=4, seed=cfg.seed)[0]  # the run's starting point
    assert (
        evaluate(model, examples(tok), cfg, ids_of(tok))
        < evaluate(fresh, examples(tok), cfg, ids_of(tok)) - 0.2  # nats per blank token (0.3 measured)
    )


def test_a_saved_adapter_reloads_with_the_live_logits(tiny_checkpoint, tmp_path):
    model, tok = prefixed(tiny_checkpoint, length=4, noise=1.0)  # a prefix no initialisation would give
    live = logits(model, tok)
    identity = base_identity(tiny_checkpoint, model.config)
    folder = save_adapter(tmp_path / "adapter", model, identity)
    meta, tensors = read_adapter(folder)
    assert meta["method"] == "ptuning" and meta["options"] == {"length": 4}
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    assert {tuple(t.shape) for t in tensors.values()} == {(4, heads, head_dim)}
    reloaded = attach_adapter(load_model(tiny_checkpoint)[0], folder, tiny_checkpoint)
    # fp32 tensors stored as they are: the same computation, so only summation order may differ; 1e-5 of the
    # largest logit magnitude is far below what a wrong or missing prefix gives (the check above: 1e-2)
    assert relative_error(logits(reloaded, tok), live) < 1e-5
    assert relative_error(live, logits(load_model(tiny_checkpoint)[0], tok)) > 1e-2


def test_the_command_line_trains_a_prefix_and_refuses_to_merge_it(tiny_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PROMPTS])
    run = tmp_path / "run"
    args = ["--checkpoint", tiny_checkpoint, "--data", data, "--output", run, "--method", "ptuning"]
    args += ["--prefix-length", "3", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        cli([str(a) for a in args])
    assert exit_.value.code == 0
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == "ptuning" and meta["options"] == {"length": 3}

    from glm.api import load_from_args
    from glm.cli.generate import build_parser

    parsed = build_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--adapter", str(run / "adapter"), "--device", "cpu"]
    )
    model, tok = load_from_args(parsed)
    live = attach_adapter(load_model(tiny_checkpoint)[0], run / "adapter", tiny_checkpoint)
    assert torch.equal(logits(model, tok), logits(live, tok))

    capsys.readouterr()
    merge = ["--merge", str(tmp_path / "merged"), "--adapter", str(run / "adapter")]
    with pytest.raises(SystemExit) as exit_:
        cli(["--checkpoint", str(tiny_checkpoint), *merge])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "P-tuning adapter" in err and "cannot be merged" in err
    assert not (tmp_path / "merged").exists()


def test_a_bad_prefix_length_is_one_line_and_nothing_is_written(tiny_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        cli([*args, "--method", "ptuning", "--prefix-length", "0"])
    err = capsys.readouterr().err.strip()
    assert (
        exit_.value.code == 2
        and "--prefix-length 0: must be at least 1" in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "run").exists()
