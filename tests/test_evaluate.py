"""Task classes (glm.evaluation.tasks) on the tiny model, against independent computations by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scoring_oracle import choice_positions, per_choice_scores, window_nll_by_hand

from glm.decoding import generate
from glm.decoding.strategies import BeamSearchStrategy
from glm.evaluation.config import config_from_dict
from glm.evaluation.dataset import encode_choice
from glm.evaluation.metrics import normalize_answer
from glm.evaluation.tasks import GenerationTask, LanguageModelTask, MultiChoiceTask, task_class

REPO = Path(__file__).resolve().parent.parent

MUL_ITEMS = [
    {
        "inputs_pretokenized": "北京是[MASK]的首都。",
        "choices_pretokenized": ["中国", "日本", "美国"],
        "label": 0,
    },
    {"inputs_pretokenized": "The cat sat on the", "choices_pretokenized": [" mat", " dog"], "label": 1},
    {"inputs_pretokenized": "今天天气[MASK]。", "choices_pretokenized": ["很好", "不好"], "label": 1},
]
GEN_ITEMS = [{"inputs_pretokenized": "The river [MASK] the town."}, {"inputs_pretokenized": "Music and"}]
LM_TEXT = "The river runs past the old mill and on into the town by the sea.\n" * 6


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def make_task(cls, model, tokenizer, root: Path, **config):
    return cls(model, tokenizer, config_from_dict(config), root)


def oracle_scores(
    model, tokenizer, item: dict, use_task_mask: bool = False, multitask: bool = False
) -> list[float]:
    """Every choice alone in its own row; the context is the plain-text input, the task's mask appended."""
    mask = tokenizer.get_command("[gMASK]" if use_task_mask else "[MASK]")
    context = [*tokenizer.tokenize(item["inputs_pretokenized"]), mask]
    choices = [encode_choice(tokenizer, c) for c in item["choices_pretokenized"]]
    positions = choice_positions(len(context), None if use_task_mask else len(context) - 1, multitask)
    return per_choice_scores(model, context, choices, tokenizer.sop_id, positions)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@pytest.mark.parametrize(("use_task_mask", "multitask"), [(False, False), (True, False), (False, True)])
def test_multiple_choice_accuracy_equals_each_choice_alone(
    tiny_model, tmp_path, capsys, use_task_mask, multitask
):
    model, tokenizer = tiny_model
    write(tmp_path / "mul/p1/test.jsonl", jsonl(MUL_ITEMS))
    write(tmp_path / "mul/p2/test.jsonl", jsonl(MUL_ITEMS[:1]))
    config = dict(name="m", type="mul", path="mul", micro_batch_size=2, use_task_mask=use_task_mask)
    task = make_task(MultiChoiceTask, model, tokenizer, tmp_path, use_multitask_encoding=multitask, **config)
    result = task.evaluate()

    scores = [oracle_scores(model, tokenizer, item, use_task_mask, multitask) for item in MUL_ITEMS]
    correct = [argmax(s) == item["label"] for s, item in zip(scores, MUL_ITEMS, strict=True)]
    metrics, count = result.groups["all"]["p1/test.jsonl"]
    assert count == 3 and metrics["Accuracy"] == pytest.approx(100 * sum(correct) / 3)
    out = capsys.readouterr().out
    assert "Evaluating task m:\n    Evaluating group all:\n        Finish p1/test.jsonl, Accuracy = " in out
    assert "Evaluation results of task m:\n    Group all Accuracy: max = " in out


def test_multitask_encoding_positions_through_the_task(tiny_model, tmp_path) -> None:
    """use_multitask_encoding: [MASK] blocks count positions up from the appended mask (the original's
    layout); without it they all take the mask's position."""
    model, tokenizer = tiny_model
    item = {"inputs": [30, 31, 32], "choices": [[40, 41, 42], [43]], "label": 0}
    write(tmp_path / "mul/test.jsonl", jsonl([item]))
    positions = {}
    for multitask in (False, True):
        config = dict(name="m", type="mul", path="mul", use_multitask_encoding=multitask)
        task = make_task(MultiChoiceTask, model, tokenizer, tmp_path, **config)
        (sample,) = task.build_dataset(tmp_path / "mul/test.jsonl").samples
        positions[multitask] = sample.row.position_ids
    assert positions[False] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert positions[True] == [0, 1, 2, 3, 3, 4, 5, 3]


def greedy_answer(model, tokenizer, text: str, steps: int) -> str:
    """Greedy decoding by hand: the whole sequence recomputed each step, [MASK] appended, then sop; mask
    tokens and padding rows are never generated."""
    mask, sop = tokenizer.get_command("[MASK]"), tokenizer.sop_id
    context = [*tokenizer.tokenize(text), mask, sop]
    n, generated = len(context), []
    for _ in range(steps):
        tokens = [*context, *generated]
        length = len(tokens)
        visible = torch.ones(length, length, dtype=torch.bool).tril()
        visible[:, : n - 1] = True  # the context before sop is bidirectional and seen by all
        positions = [*range(n - 1), *[n - 2] * (length - n + 1)]  # sop and the answer at the mask's position
        logits = model(torch.tensor([tokens]), torch.tensor([positions]), ~visible[None, None])[0, -1]
        logits[sorted(tokenizer.mask_ids.values())] = -math.inf  # never a mask token ...
        logits[tokenizer.vocab_size :] = -math.inf  # ... nor a padding row of the embedding
        token = int(logits.argmax())
        if token in tokenizer.end_ids:
            break
        generated.append(token)
    return tokenizer.detokenize(generated)


def test_generation_em_against_greedy_decoding_by_hand(tiny_model, tmp_path) -> None:
    model, tokenizer = tiny_model
    answers = [greedy_answer(model, tokenizer, item["inputs_pretokenized"], 6) for item in GEN_ITEMS]
    assert normalize_answer(answers[0])
    items = [  # the first target is the greedy answer, the second one word longer: EM 50, F1 in between
        GEN_ITEMS[0] | {"targets_pretokenized": [answers[0]]},
        GEN_ITEMS[1] | {"targets_pretokenized": [answers[1] + " zebra"]},
    ]
    write(tmp_path / "gen/test.jsonl", jsonl(items))
    config = dict(name="g", type="gen", path="gen", max_gen_length=6, micro_batch_size=2)
    result = make_task(GenerationTask, model, tokenizer, tmp_path, **config).evaluate()
    metrics, count = result.groups["all"]["test.jsonl"]
    assert count == 2 and metrics["EM"] == 50.0
    words = len(normalize_answer(answers[1]).split())
    f1_second = 2 * words / (2 * words + 1) if words else 0.0  # precision 1, recall words / (words + 1)
    assert metrics["F1"] == pytest.approx(100 * (1 + f1_second) / 2)


def test_language_model_metrics_by_hand(tiny_model, tmp_path, capsys) -> None:
    model, tokenizer = tiny_model
    write(tmp_path / "lm/test.txt", LM_TEXT)
    config = dict(name="l", type="lm", path="lm", file_pattern="*.txt", use_task_mask=True, max_seq_length=24)
    task = make_task(
        LanguageModelTask, model, tokenizer, tmp_path, micro_batch_size=3, generation_length=8, **config
    )
    metrics, count = task.evaluate().groups["all"]["test.txt"]
    ids = tokenizer.tokenize(LM_TEXT)
    gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.sop_id
    windows = max(math.ceil(max(len(ids) - 23, 0) / 8) + 1, 1)  # the original's num_sequences
    nll = 0.0
    for i in range(windows):  # 23 tokens each; after the first, 15 of context and 8 scored
        chunk = ids[i * 8 : i * 8 + 23]
        cut = 0 if i == 0 else 15
        if chunk[cut:]:
            nll += window_nll_by_hand(model, chunk[:cut], chunk[cut:], gmask, sop)
    words, size = len(LM_TEXT.strip().split(" ")), len(LM_TEXT.encode())
    assert count == windows
    assert metrics["PPL"] == pytest.approx(math.exp(min(20, nll / words)), rel=1e-4)
    assert metrics["PPL_token"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
    assert metrics["BPB_text"] == pytest.approx(nll / size / math.log(2), rel=1e-4)
    out = capsys.readouterr().out
    assert f"(PPL per {words} space-separated words, as the original; PPL_token per {len(ids)} tokens" in out


def test_too_long_settings_warn_naming_both_numbers(tiny_model, tmp_path, capsys) -> None:
    model, tokenizer = tiny_model
    write(tmp_path / "lm/test.txt", LM_TEXT)
    config = dict(name="l", type="lm", path="lm", file_pattern="*.txt", use_task_mask=True)
    task = make_task(
        LanguageModelTask, model, tokenizer, tmp_path, max_seq_length=4096, generation_length=2000, **config
    )
    err = capsys.readouterr().err
    limit = model.config.max_sequence_length
    assert (
        f"warning: task 'l': max_seq_length 4096 is above the model's maximum sequence length {limit}; "
        f"using {limit}" in err
    )
    assert f"generation_length 2000 is above max_seq_length - 1 = {limit - 1}; using {limit - 1}" in err
    dataset = task.build_dataset(tmp_path / "lm/test.txt")
    assert [t for w in dataset.samples for t in w.text] == tokenizer.tokenize(LM_TEXT)  # each token once
    make_task(LanguageModelTask, model, tokenizer, tmp_path, max_seq_length=limit, **config)
    assert "warning" not in capsys.readouterr().err


def test_custom_module_and_lambada() -> None:
    config = config_from_dict(dict(name="lam", type="gen", path="gen", module="tasks.lambada.task.LAMBADA"))
    cls = task_class(config)
    assert cls.__name__ == "LAMBADA" and issubclass(cls, GenerationTask)
    from tasks.lambada.task import first_word, first_word_accuracy

    assert first_word("  commandments. And") == "commandments"
    assert first_word_accuracy(["Him", "him"], [{"targets": ["him"]}, {"targets": [" him "]}]) == 50.0
    with pytest.raises(ValueError, match=r"cannot import module 'no\.such\.Task'"):
        task_class(config_from_dict(dict(name="x", type="gen", path="gen", module="no.such.Task")))


def test_beam_search_generation_equals_generate(tiny_model, tmp_path) -> None:
    model, tokenizer = tiny_model
    write(tmp_path / "gen/test.jsonl", jsonl(GEN_ITEMS))
    config = dict(name="b", type="gen", path="gen", sampling_strategy="BeamSearchStrategy", num_beams=2)
    task = make_task(
        GenerationTask, model, tokenizer, tmp_path, max_gen_length=4, micro_batch_size=2, **config
    )
    samples = task.build_dataset(tmp_path / "gen/test.jsonl").samples
    predictions = task.predict_single_batch(samples)
    masks = sorted(tokenizer.mask_ids.values())
    invalid = [slice(masks[0], masks[-1] + 1), slice(tokenizer.vocab_size, None)]
    strategy = BeamSearchStrategy(
        2,
        2,
        consider_end=True,
        end_tokens=tokenizer.end_ids,
        invalid_slices=invalid,
        no_repeat_ngram_size=3,
        deterministic=True,
    )
    contexts = [sample.tokens for sample in samples]
    outputs = generate(model, contexts, strategy, 4, [sample.mask_position for sample in samples])
    for context, beams, prediction in zip(contexts, outputs, predictions, strict=True):
        best = beams[0][len(context) :]
        best = best[:-1] if best and best[-1] in tokenizer.end_ids else best
        assert prediction == tokenizer.detokenize(best)


def test_written_mask_module_fills_the_blank_in_place(tiny_model, tmp_path) -> None:
    """tasks/offline/blank.py: the idiom cloze's written [MASK] is the blank (the default task reads it as
    text and appends its own mask)."""
    model, tokenizer = tiny_model
    item = {
        "inputs_pretokenized": "这固然得费一番[MASK]的工夫。",
        "choices_pretokenized": ["爬罗剔抉", "立足之地"],
        "label": 0,
    }
    write(tmp_path / "mul/test.jsonl", jsonl([item]))
    config = config_from_dict(
        dict(name="z", type="mul", path="mul", module="tasks.offline.blank.WrittenMaskMultiChoice")
    )
    task = task_class(config)(model, tokenizer, config, tmp_path)
    (sample,) = task.build_dataset(tmp_path / "mul/test.jsonl").samples
    context = tokenizer.tokenize_with_masks(item["inputs_pretokenized"])
    mask = tokenizer.get_command("[MASK]")
    assert sample.context == context and context.count(mask) == 1 and context[-1] != mask
    choices = [encode_choice(tokenizer, c) for c in item["choices_pretokenized"]]
    want = per_choice_scores(
        model, context, choices, tokenizer.sop_id, choice_positions(len(context), context.index(mask))
    )
    assert task.score([sample])[0] == pytest.approx(want, abs=1e-3)
