"""The Pile customisation (`tasks/language-modeling/pile.py`, module `tasks.language-modeling.pile.Pile`):
per-document LM windows, BPB per `pile_set_name` = Σ window NLL / Σ UTF-8 bytes / ln 2, and the original's
per-category group report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scoring_oracle import window_nll_by_hand

from glm.evaluation.config import load_task_config
from glm.evaluation.tasks import LanguageModelTask, task_class

CONFIG = Path(__file__).resolve().parent.parent / "tasks" / "language-modeling" / "pile.yaml"
MAX_SEQ, GEN = 24, 8

ARXIV_LONG = (
    "We study the convergence of stochastic gradient descent on smooth non-convex objectives. "
    "Our analysis shows that the expected gradient norm decays at the optimal rate, "
    "and we verify the bound numerically on several benchmark problems with résumé-style notes."
)
ARXIV_SHORT = "A short abstract about graphs and their colourings."
GITHUB = "def add(a, b):\n    return a + b\n"


def _write(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


def _doc(text: str, category: str, ids: list[int] | None = None) -> dict:
    item: dict = {"text_pretokenized": text, "meta": {"pile_set_name": category}}
    return item if ids is None else {"text": ids} | item


def _windows(tokenizer, text: str) -> int:
    """The original's `num_sequences`."""
    return max(math.ceil(max(len(tokenizer.tokenize(text)) - (MAX_SEQ - 1), 0) / GEN) + 1, 1)


def _document_nll(model, tokenizer, text: str) -> float:
    """Σ NLL of the original's windows over one document, each in its literal layout (scoring_oracle)."""
    ids = tokenizer.tokenize(text)
    total = 0.0
    for i in range(_windows(tokenizer, text)):
        chunk = ids[i * GEN : i * GEN + MAX_SEQ - 1]
        prefix = 0 if i == 0 else MAX_SEQ - 1 - GEN
        gmask = tokenizer.get_command("[gMASK]")
        total += window_nll_by_hand(model, chunk[:prefix], chunk[prefix:], gmask, tokenizer.sop_id)
    return total


def _bpb(nll: float, *texts: str) -> float:
    return nll / sum(len(t.encode("utf-8")) for t in texts) / math.log(2)


def _task(tiny_model, root: Path, **overrides):
    model, tokenizer = tiny_model
    config = load_task_config(CONFIG)
    config.max_seq_length, config.generation_length, config.micro_batch_size = MAX_SEQ, GEN, 3
    for key, value in overrides.items():
        setattr(config, key, value)
    cls = task_class(config)
    assert issubclass(cls, LanguageModelTask) and cls.__name__ == "Pile"
    return cls(model, tokenizer, config, root)


def test_pile_bpb_per_category_and_report(tiny_model, tmp_path: Path, capsys) -> None:
    model, tokenizer = tiny_model
    assert len(tokenizer.tokenize(ARXIV_LONG)) > MAX_SEQ + GEN  # several windows
    _write(
        tmp_path / "pile/a/test_tokenized.jsonl",
        [
            _doc(ARXIV_LONG, "ArXiv", ids=tokenizer.tokenize(ARXIV_LONG)),  # pre-tokenized ids are used
            {"text": [], "text_pretokenized": "", "meta": {"pile_set_name": "Enron Emails"}},  # skipped
            _doc(GITHUB, "Github"),  # re-tokenized from text_pretokenized
        ],
    )
    _write(tmp_path / "pile/b/test_tokenized.jsonl", [_doc(ARXIV_SHORT, "ArXiv")])
    report = _task(tiny_model, tmp_path).evaluate().to_json()

    nll = {t: _document_nll(model, tokenizer, t) for t in (ARXIV_LONG, ARXIV_SHORT, GITHUB)}
    files = report["groups"]["test"]["files"]
    first, second = files["a/test_tokenized.jsonl"], files["b/test_tokenized.jsonl"]
    assert first["samples"] == _windows(tokenizer, ARXIV_LONG) + _windows(tokenizer, GITHUB)
    assert second["samples"] == _windows(tokenizer, ARXIV_SHORT)
    expected_first = {
        "BPB ArXiv": _bpb(nll[ARXIV_LONG], ARXIV_LONG),
        "BPB Github": _bpb(nll[GITHUB], GITHUB),
        "BPB overall": _bpb(nll[ARXIV_LONG] + nll[GITHUB], ARXIV_LONG, GITHUB),
    }
    assert list(first["metrics"]) == list(expected_first)
    for key, value in expected_first.items():
        assert first["metrics"][key] == pytest.approx(value, rel=1e-4), key
    assert second["metrics"]["BPB ArXiv"] == pytest.approx(_bpb(nll[ARXIV_SHORT], ARXIV_SHORT), rel=1e-4)

    # The group report pools both files: the original's block, then an overall line.
    pooled = {
        "ArXiv": _bpb(nll[ARXIV_LONG] + nll[ARXIV_SHORT], ARXIV_LONG, ARXIV_SHORT),
        "Github": _bpb(nll[GITHUB], GITHUB),
        "overall": _bpb(sum(nll.values()), ARXIV_LONG, ARXIV_SHORT, GITHUB),
    }
    out = capsys.readouterr().out
    assert "Finish a/test_tokenized.jsonl" not in out  # per-file lines are suppressed, as the original
    lines = out.splitlines()
    start = lines.index("    Finish group test:")
    assert lines[start + 1 : start + 5] == [*(f"        {k} = {v:.3f}" for k, v in pooled.items()), ""]
    assert lines[start + 5] == "Finish task Pile in " + lines[start + 5].split(" in ")[1]


def test_pile_limit_and_foreign_ids(tiny_model, tmp_path: Path) -> None:
    model, tokenizer = tiny_model
    _write(
        tmp_path / "pile/test_tokenized.jsonl",
        [_doc(ARXIV_LONG, "ArXiv"), _doc(GITHUB, "Github")],
    )
    task = _task(tiny_model, tmp_path)
    task.limit = 2  # the first two windows of the long document; its bytes counted pro rata
    dataset = task.build_dataset(tmp_path / "pile/test_tokenized.jsonl")
    assert len(dataset.samples) == 2 and len(dataset.data) == 1
    scored = sum(len(w.text) for w in dataset.samples)
    ratio = scored / len(tokenizer.tokenize(ARXIV_LONG))
    assert dataset.data[0]["utf8_length"] == pytest.approx(len(ARXIV_LONG.encode()) * ratio)

    # As the original, `text` ids win over `text_pretokenized`, whose bytes are still what BPB divides by.
    _write(tmp_path / "pile/test_tokenized.jsonl", [_doc(GITHUB, "Github", ids=tokenizer.tokenize("a b"))])
    dataset = task.build_dataset(tmp_path / "pile/test_tokenized.jsonl")
    assert [w.text for w in dataset.samples] == [tokenizer.tokenize("a b")]
    assert dataset.data == [
        {"num_sequences": 1, "utf8_length": len(GITHUB), "meta": {"pile_set_name": "Github"}}
    ]

    _write(tmp_path / "pile/test_tokenized.jsonl", [_doc("x", "ArXiv", ids=[model.config.vocab_size + 5])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        task.build_dataset(tmp_path / "pile/test_tokenized.jsonl")
