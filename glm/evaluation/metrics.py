"""Evaluation metrics of the original GLM-130B evaluator (`evaluation/metrics.py`), in a registry.

Every metric is a function of (predictions, examples): the gathered predictions of one file, in order, and
the dataset's items (dicts) for that file. It returns a float (a percentage for the accuracy-like metrics)
or, for BPB, one float per category. Custom tasks add their own with `register_metric`.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

Examples = Sequence[Mapping[str, Any]]
MetricFn = Callable[[Sequence[Any], Examples], "float | dict[str, float]"]
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Metric:
    """A named metric function and whether a larger value is better."""

    name: str
    fn: MetricFn
    higher_is_better: bool = True

    def __call__(self, predictions: Sequence[Any], examples: Examples) -> float | dict[str, float]:
        return self.fn(predictions, examples)


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str, fn: MetricFn, higher_is_better: bool = True, overwrite: bool = False
) -> Metric:
    """Add `fn` to `METRICS` under `name`; an existing name is an error unless `overwrite`."""
    if name in METRICS and not overwrite:
        raise ValueError(f"metric '{name}' is already registered (pass overwrite=True to replace it)")
    METRICS[name] = metric = Metric(name, fn, higher_is_better)
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric `name`; an unknown name is an error naming the nearest known one.

    The original mapped unknown names to a stub that printed a warning and returned True.
    """
    if name not in METRICS:
        close = difflib.get_close_matches(name, METRICS, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known metrics: {', '.join(sorted(METRICS))}"
        raise ValueError(f"unknown metric '{name}'; {hint}")
    return METRICS[name]


def get_metrics(names: Iterable[str]) -> dict[str, Metric]:
    """The registered metrics for `names`, in order (see `get_metric`)."""
    return {name: get_metric(name) for name in names}


def _check_lengths(predictions: Sequence[Any], examples: Sequence[Any]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")


# ---------------------------------------------------------------- multiple choice


def accuracy(predictions: Sequence[Any], examples: Examples) -> float:
    """Percentage of predictions equal to `example["label"]` (0 for an empty file)."""
    _check_lengths(predictions, examples)
    correct = sum(
        prediction == example["label"] for prediction, example in zip(predictions, examples, strict=True)
    )
    return 100.0 * correct / max(len(predictions), 1)


def _as_list(value: Any) -> Any:
    """NumPy/torch values as plain Python ones (scalars stay scalars)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _micro_counts(predictions: Sequence[Any], examples: Examples) -> tuple[int, int, int]:
    """(true positives, predicted positives, actual positives) summed over all labels, as sklearn's
    `average="micro"`.

    Single labels (binary or multiclass): each sample has one predicted and one true label, so all three
    micro scores equal the accuracy. Multi-label indicator rows (lists of 0/1): counted per entry.
    """
    _check_lengths(predictions, examples)
    preds = [_as_list(p) for p in predictions]
    golds = [_as_list(example["label"]) for example in examples]
    is_row = [isinstance(v, (list, tuple)) for v in preds + golds]
    if not any(is_row):
        correct = sum(p == g for p, g in zip(preds, golds, strict=True))
        return correct, len(preds), len(golds)
    if not all(is_row):
        raise ValueError("mix of single labels and multi-label rows")
    rows = preds + golds
    if len({len(row) for row in rows}) > 1 or any(v not in (0, 1) for row in rows for v in row):
        raise ValueError("multi-label rows must be 0/1 indicator lists of one width")
    tp = sum(
        p and g for pred, gold in zip(preds, golds, strict=True) for p, g in zip(pred, gold, strict=True)
    )
    return tp, sum(map(sum, preds)), sum(map(sum, golds))


def precision(predictions: Sequence[Any], examples: Examples) -> float:
    """Micro-averaged precision ×100 of predictions against `example["label"]` (0 when nothing predicted)."""
    tp, predicted, _ = _micro_counts(predictions, examples)
    return 100.0 * tp / predicted if predicted else 0.0


def recall(predictions: Sequence[Any], examples: Examples) -> float:
    """Micro-averaged recall ×100 of predictions against `example["label"]` (0 when no positives)."""
    tp, _, actual = _micro_counts(predictions, examples)
    return 100.0 * tp / actual if actual else 0.0


def f1_multiple_choice(predictions: Sequence[Any], examples: Examples) -> float:
    """Micro-averaged F1 ×100 of predictions against `example["label"]` (the original's `F1_mul`)."""
    tp, predicted, actual = _micro_counts(predictions, examples)
    return 200.0 * tp / (predicted + actual) if predicted + actual else 0.0


# ---------------------------------------------------------------- generation (SQuAD-style)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1_score(prediction: str, gold: str) -> float:
    """F1 over the normalised whitespace tokens (a multiset overlap); 0.0 when nothing overlaps.

    Text without spaces (e.g. Chinese) is one token, so it scores 0 or 1, as in the original.
    """
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * p * r / (p + r)


def _text(value: str | Sequence[int], decode: Decode | None) -> str:
    if isinstance(value, str):
        return value
    if decode is None:
        raise TypeError("token ids need a decode function to be scored as text")
    return decode(_as_list(value))


def qa_evaluate(
    predictions: Sequence[str | Sequence[int]],
    examples: Examples,
    score: Callable[[str, str], float],
    decode: Decode | None = None,
) -> float:
    """Mean over samples ×100 of the best `score` against any of `example["targets"]`.

    Predictions and targets are strings, or token ids turned into text by `decode`. A sample without
    targets scores 0 but still counts. An empty file scores 0 (the original divided by zero).
    """
    _check_lengths(predictions, examples)
    total = 0.0
    for prediction, example in zip(predictions, examples, strict=True):
        text = _text(prediction, decode)
        total += max((score(text, _text(gold, decode)) for gold in example["targets"]), default=0.0)
    return 100.0 * total / max(len(predictions), 1)


def qa_exact_match(predictions: Sequence[Any], examples: Examples, decode: Decode | None = None) -> float:
    """The original's `EM`."""
    return qa_evaluate(predictions, examples, exact_match_score, decode)


def qa_f1(predictions: Sequence[Any], examples: Examples, decode: Decode | None = None) -> float:
    """The original's `F1` (token F1, not the multiple-choice `F1_mul`)."""
    return qa_evaluate(predictions, examples, token_f1_score, decode)


# ---------------------------------------------------------------- language modelling


def count_original_tokens(raw_text: str) -> int:
    """The word count PPL divides by: `len(raw_text.strip().split(" "))`, split on single spaces only,
    as the original (so "a\\nb" is one word and a double space adds an empty one)."""
    return len(raw_text.strip().split(" "))


def perplexity(losses: Sequence[float], data: Examples) -> float:
    """Word-level perplexity: exp(min(20, Σ window NLL in nats / data[0]["num_original_tokens"])).

    `losses` are the summed NLLs of the sliding windows over the file's one document.
    """
    return math.exp(min(20.0, math.fsum(losses) / data[0]["num_original_tokens"]))


def token_perplexity(losses: Sequence[float], data: Examples) -> float:
    """Perplexity per scored token: exp(Σ window NLL / data[0]["num_tokens"]) (not in the original)."""
    return math.exp(math.fsum(losses) / data[0]["num_tokens"])


def text_bits_per_byte(losses: Sequence[float], data: Examples) -> float:
    """Bits per UTF-8 byte of the document: Σ window NLL / data[0]["utf8_length"] / ln 2 (not in the
    original, which had this only per Pile category: `BPB`)."""
    return math.fsum(losses) / data[0]["utf8_length"] / math.log(2)


# What every language-model task reports beside its configured metrics.
LM_COUNTS = ("PPL_token", "BPB_text")


def bits_per_byte(losses: Sequence[float], data: Examples) -> dict[str, float]:
    """Per Pile category: Σ window NLL (nats) / Σ UTF-8 bytes / ln 2.

    `data` items have `num_sequences` (windows), `utf8_length` and `meta["pile_set_name"]`; `losses` are
    the windows of all documents in order. Only categories with at least one window are returned.
    """
    ends = list(accumulate(item["num_sequences"] for item in data))
    loss: dict[str, float] = {}
    length: dict[str, float] = {}
    for item in data:
        name = item["meta"]["pile_set_name"]
        length[name] = length.get(name, 0) + item["utf8_length"]
    for index, value in enumerate(losses):
        name = data[bisect_right(ends, index)]["meta"]["pile_set_name"]
        loss[name] = loss.get(name, 0.0) + value
    return {name: total / length[name] / math.log(2) for name, total in loss.items()}


for _name, _fn, _higher in [
    ("Accuracy", accuracy, True),
    ("EM", qa_exact_match, True),
    ("F1", qa_f1, True),
    ("PPL", perplexity, False),
    ("BPB", bits_per_byte, False),
    ("PPL_token", token_perplexity, False),
    ("BPB_text", text_bits_per_byte, False),
    ("Precision", precision, True),
    ("Recall", recall, True),
    ("F1_mul", f1_multiple_choice, True),
]:
    register_metric(_name, _fn, _higher)
