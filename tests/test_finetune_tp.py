"""Fine-tuning under tensor parallelism (2 gloo ranks, as torchrun starts them) against the same model and
run in one process: the gradient of every adapter tensor (LoRA on every target layer, column- and
row-parallel; P-tuning v2's prefix), gathered whole, is the one-process gradient; and a training run (LoRA
with dropout and clipping, interrupted and resumed; P-tuning) gives, step by step, the same loss and the
same gradient norm, and saves the same adapter; a state written at 2 ranks resumes in one process."""

from __future__ import annotations

from pathlib import Path

import torch
from ranks import run_ranks
from test_finetune import examples, ids_of, quick

from glm import distributed, tensor_parallel
from glm.adapters.files import read_adapter, save_adapter
from glm.adapters.lora import full_state_dict
from glm.adapters.methods import method_named
from glm.finetune.gradients import sum_partial_gradients
from glm.finetune.loop import adapter_options, batch_of, loss_sum, train
from glm.loading import load_model

# fp32 throughout: the sums over ranks change only the order of additions. Relative to the largest value
# of what is compared. Losses are logged to 4 decimals, gradient norms to 6 digits.
GRADIENTS = 1e-5
LOGGED = 1e-4
# AdamW moves each element by about lr whatever its gradient's size, so an element whose gradient is near
# zero turns its gradient's rounding (1e-6 of the largest, above) into a step of full size: after a few
# steps the trained adapters agree to about 1e-3 of their largest value.
ADAPTER = 1e-2

RUNS = {
    # 4 examples in batches of 3: epochs interleave; the clip acts from the third step on
    "lora": (quick(steps=4, batch_size=3, dropout=0.1, grad_clip=0.05), [2, None]),
    "ptuning": (quick(steps=2, batch_size=2, method="ptuning", prefix_length=3), [None]),
}


def fine_tune(checkpoint: Path, out: Path, stops: dict[str, list[int | None]]) -> dict[str, list[dict]]:
    """Each run of RUNS in `out`, stopped and resumed as `stops` says; the log records and the adapter."""
    transforms = [tensor_parallel.transform()]  # a no-op in one process
    logs = {}
    for name, (cfg, _) in RUNS.items():
        records = []
        for stop in stops[name]:
            model, tok = load_model(checkpoint, transforms=transforms)
            records += train(
                model, examples(tok), cfg, out / name, ids_of(tok), "id", stop_after=stop, quiet=True
            )
        save_adapter(out / name / "adapter", model, "id")
        logs[name] = records
    return logs


def gradients(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """The whole gradient of every adapter tensor of method `name`, for a random adapter (B non-zero, so
    that A has a gradient too; the same at every size) and one batch of every example."""
    model, tok = load_model(checkpoint, transforms=[tensor_parallel.transform()])
    method = method_named(name)
    method.apply(model, adapter_options(quick(method=name, prefix_length=3)), seed=0)
    generator = torch.Generator().manual_seed(1)
    state = method.full_state_dict(model)
    method.load_full_state_dict(
        model, {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    )
    loss, count = loss_sum(model, batch_of(examples(tok), *ids_of(tok)), bf16=False)
    (loss / count).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    sum_partial_gradients(params)
    whole, names = method.whole(model), {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: whole(names[id(p)], p.grad) for p in params}


def _rank(rank: int, checkpoint: Path, out: Path) -> None:
    distributed.initialize(tensor_parallel_size=2)
    grads = {name: gradients(checkpoint, name) for name in RUNS}
    logs = fine_tune(checkpoint, out, {name: stops for name, (_, stops) in RUNS.items()})
    model, tok = load_model(checkpoint, transforms=[tensor_parallel.transform()])  # half a run, to resume
    train(model, examples(tok), RUNS["lora"][0], out / "half", ids_of(tok), "id", stop_after=2, quiet=True)
    if rank == 0:
        torch.save({"gradients": grads, "logs": logs}, out / "results.pt")
    distributed.shutdown()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def test_two_ranks_compute_the_one_process_gradients_and_adapter(tiny_checkpoint, tmp_path):
    run_ranks(_rank, 2, tiny_checkpoint, tmp_path / "two", timeout=300)
    parallel = torch.load(tmp_path / "two" / "results.pt", weights_only=True)
    single = fine_tune(tiny_checkpoint, tmp_path / "one", {name: [None] for name in RUNS})
    for name in RUNS:
        reference = gradients(tiny_checkpoint, name)
        assert set(parallel["gradients"][name]) == set(reference)
        for key, value in reference.items():
            assert relative_error(parallel["gradients"][name][key], value) <= GRADIENTS, (name, key)
        for field in ("loss", "grad_norm"):
            ours, reference = [r[field] for r in parallel["logs"][name]], [r[field] for r in single[name]]
            assert relative_error(torch.tensor(ours), torch.tensor(reference)) <= LOGGED, (field, ours)
        _, ours = read_adapter(tmp_path / "two" / name / "adapter")
        _, reference = read_adapter(tmp_path / "one" / name / "adapter")
        assert set(ours) == set(reference)
        for key, value in reference.items():
            assert relative_error(ours[key], value) <= ADAPTER, (name, key)
    # the state is whole: a run started at 2 ranks resumes in one process
    model, tok = load_model(tiny_checkpoint)
    records = train(
        model, examples(tok), RUNS["lora"][0], tmp_path / "two" / "half", ids_of(tok), "id", quiet=True
    )
    assert [r["step"] for r in records] == [3, 4]
    for field in ("loss", "grad_norm"):
        ours, reference = [r[field] for r in records], [r[field] for r in single["lora"][2:]]
        assert relative_error(torch.tensor(ours), torch.tensor(reference)) <= LOGGED, (field, ours)
    _, reference = read_adapter(tmp_path / "one" / "lora" / "adapter")
    for key, value in full_state_dict(model).items():
        assert relative_error(value, reference[key]) <= ADAPTER, key
    # rank 0 alone wrote, and only what one process writes
    assert sorted(p.name for p in (tmp_path / "two" / "lora").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "lora").iterdir()
    )
