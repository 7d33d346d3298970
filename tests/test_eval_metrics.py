"""Evaluation metrics against hand-computed values on small fixtures."""

from __future__ import annotations

import math

import pytest

from glm.evaluation.metrics import (
    METRICS,
    accuracy,
    bits_per_byte,
    count_original_tokens,
    exact_match_score,
    f1_multiple_choice,
    get_metric,
    get_metrics,
    normalize_answer,
    perplexity,
    precision,
    qa_exact_match,
    qa_f1,
    recall,
    register_metric,
    token_f1_score,
)


def labelled(labels: list) -> list[dict]:
    return [{"label": label} for label in labels]


# ---------------------------------------------------------------- registry


def test_registry_holds_the_original_metrics() -> None:
    assert set(METRICS) >= {"Accuracy", "EM", "F1", "PPL", "BPB", "Precision", "Recall", "F1_mul"}
    assert not METRICS["PPL"].higher_is_better and not METRICS["BPB"].higher_is_better
    assert METRICS["Accuracy"].higher_is_better
    assert METRICS["Accuracy"]([1, 0], labelled([1, 1])) == 50.0


def test_unknown_metric_names_the_nearest() -> None:
    with pytest.raises(ValueError, match="unknown metric 'Acuracy'; did you mean 'Accuracy'"):
        get_metric("Acuracy")
    with pytest.raises(ValueError, match="known metrics: Accuracy, BPB"):
        get_metrics(["EM", "zzz"])


def test_register_custom_metric() -> None:
    try:
        metric = register_metric("Count", lambda predictions, examples: float(len(predictions)), False)
        assert get_metrics(["Count", "EM"])["Count"] is metric
        assert metric([1, 2, 3], labelled([0, 0, 0])) == 3.0 and not metric.higher_is_better
        with pytest.raises(ValueError, match="already registered"):
            register_metric("Count", lambda predictions, examples: 0.0)
        register_metric("Count", lambda predictions, examples: 0.0, overwrite=True)
        assert METRICS["Count"]([], []) == 0.0
    finally:
        METRICS.pop("Count", None)


# ---------------------------------------------------------------- multiple choice


def test_accuracy() -> None:
    # matches at 0, 2, 3 -> 3 of 4
    assert accuracy([0, 2, 1, 1], labelled([0, 1, 1, 1])) == 75.0
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        accuracy([0, 1], labelled([0]))


def test_micro_scores_of_single_labels_equal_accuracy() -> None:
    # Multiclass: correct at 0, 2, 4 -> 3 of 5. Micro-averaged over all classes, every sample has one
    # predicted and one true label, so TP = 3 and TP+FP = TP+FN = 5.
    preds, examples = [0, 1, 2, 2, 1], labelled([0, 2, 2, 1, 1])
    assert (
        precision(preds, examples) == recall(preds, examples) == f1_multiple_choice(preds, examples) == 60.0
    )


def test_micro_scores_are_not_binary_scores() -> None:
    # Binary, labels 1 0 0 0, predictions 1 1 1 0. For class 1 alone (sklearn average="binary"):
    # P = 1/3, R = 1. Micro over both classes: class 1 TP=1 FP=2 FN=0, class 0 TP=1 FP=0 FN=2,
    # so P = 2/(2+2) = 50, R = 2/(2+2) = 50, F1 = 50.
    preds, examples = [1, 1, 1, 0], labelled([1, 0, 0, 0])
    assert (
        precision(preds, examples) == recall(preds, examples) == f1_multiple_choice(preds, examples) == 50.0
    )


def test_micro_scores_of_multi_label_rows() -> None:
    # Rows (pred | gold): [1,0,1] | [1,1,1] -> TP 2, predicted 2, actual 3
    #                     [0,1,0] | [0,1,0] -> TP 1, predicted 1, actual 1
    # P = 3/3 = 100, R = 3/4 = 75, F1 = 2·3/(3+4) = 85.714...
    preds, examples = [[1, 0, 1], [0, 1, 0]], labelled([[1, 1, 1], [0, 1, 0]])
    assert precision(preds, examples) == 100.0
    assert recall(preds, examples) == 75.0
    assert f1_multiple_choice(preds, examples) == pytest.approx(600 / 7)


def test_micro_scores_edge_cases() -> None:
    assert precision([[0, 0]], labelled([[1, 0]])) == 0.0  # nothing predicted
    assert recall([[1, 0]], labelled([[0, 0]])) == 0.0  # no positives
    assert f1_multiple_choice([[0, 0]], labelled([[0, 0]])) == 0.0
    assert precision([], []) == 0.0
    with pytest.raises(ValueError, match="mix"):
        precision([[1, 0], 1], labelled([[1, 0], 1]))
    with pytest.raises(ValueError, match="indicator"):
        recall([[1, 0]], labelled([[1, 0, 1]]))


# ---------------------------------------------------------------- generation


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Cat's hat, an apple!") == "cats hat apple"
    assert normalize_answer("theatre A-team") == "theatre ateam"  # articles only as whole words


def test_exact_match_with_normalisation() -> None:
    assert exact_match_score("The Cat!", "cat") == 1.0
    assert exact_match_score("cats", "cat") == 0.0
    assert exact_match_score("", "a") == 1.0  # both normalise to ""


def test_token_f1() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; 2 shared tokens.
    # P = 2/2, R = 2/3, F1 = 2·1·(2/3)/(1 + 2/3) = 0.8
    assert token_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # Multiset overlap: [x, x, y] vs [x, z] share one x.
    # P = 1/3, R = 1/2, F1 = 2·(1/6)/(5/6) = 0.4
    assert token_f1_score("x x y", "x z") == pytest.approx(0.4)
    assert token_f1_score("dog", "cat") == 0.0
    assert token_f1_score("the", "a") == 0.0  # both empty after normalisation: 0, as the original
    assert token_f1_score("北京大学", "北京") == 0.0  # no spaces: whole strings compared


def test_qa_metrics_take_the_best_target_and_average() -> None:
    predictions = ["the cat sat", "Paris", "blue"]
    examples = [{"targets": ["a cat sat down"]}, {"targets": ["London", "paris."]}, {"targets": []}]
    # EM per sample: 0, 1 (second target), 0 (no targets) -> 100/3
    assert qa_exact_match(predictions, examples) == pytest.approx(100 / 3)
    # F1 per sample: 0.8, 1.0, 0 -> 100·1.8/3 = 60
    assert qa_f1(predictions, examples) == pytest.approx(60.0)
    assert METRICS["EM"](predictions, examples) == qa_exact_match(predictions, examples)
    assert qa_f1([], []) == 0.0


def test_qa_metrics_decode_token_ids() -> None:
    vocab = ["the", "cat", "sat", "a", "down"]

    def decode(ids: list[int]) -> str:
        return " ".join(vocab[i] for i in ids)

    examples = [{"targets": [[3, 1, 2, 4]]}]
    assert qa_f1([[0, 1, 2]], examples, decode=decode) == pytest.approx(80.0)
    with pytest.raises(TypeError, match="decode"):
        qa_f1([[0, 1, 2]], examples)


# ---------------------------------------------------------------- language modelling


def test_count_original_tokens_splits_on_single_spaces() -> None:
    # strip -> "the cat  sat\nend" -> split(" ") -> [the, cat, "", "sat\nend"]
    assert count_original_tokens("  the cat  sat\nend\n") == 4


def test_perplexity() -> None:
    # Σ loss = 3 + 2 + 1 = 6 nats over 4 words -> exp(1.5)
    assert perplexity([3.0, 2.0, 1.0], [{"num_original_tokens": 4}]) == pytest.approx(math.exp(1.5))
    # capped at e^20: 100 / 2 = 50 > 20
    assert perplexity([100.0], [{"num_original_tokens": 2}]) == pytest.approx(math.exp(20))


def test_bits_per_byte_per_category() -> None:
    data = [
        {"num_sequences": 2, "utf8_length": 100, "meta": {"pile_set_name": "ArXiv"}},
        {"num_sequences": 1, "utf8_length": 50, "meta": {"pile_set_name": "Github"}},
        {"num_sequences": 1, "utf8_length": 100, "meta": {"pile_set_name": "ArXiv"}},
        {"num_sequences": 1, "utf8_length": 80, "meta": {"pile_set_name": "Enron"}},
    ]
    # windows 0,1 -> doc 0 (ArXiv), 2 -> doc 1 (Github), 3 -> doc 2 (ArXiv); doc 3 has no window here.
    # ArXiv: (10+20+40) nats / 200 bytes / ln 2; Github: 30 / 50 / ln 2. Enron is left out.
    result = bits_per_byte([10.0, 20.0, 30.0, 40.0], data)
    assert result.keys() == {"ArXiv", "Github"}
    assert result["ArXiv"] == pytest.approx(0.35 / math.log(2))
    assert result["Github"] == pytest.approx(0.6 / math.log(2))
