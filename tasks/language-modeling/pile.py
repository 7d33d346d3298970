"""The original's Pile customisation (`tasks/language-modeling/pile.py`): bits per byte per Pile subset.

    module: tasks.language-modeling.pile.Pile

Data: jsonl, one document per line, with `text` (token ids), else `text_pretokenized` (tokenized here),
plus `text_pretokenized` (whose UTF-8 bytes BPB divides by) and `meta.pile_set_name`. Documents without
tokens are skipped. Each document is cut into the original's LM windows (`max_seq_length - 1` tokens
advancing by `generation_length`, the part already scored being context only); all windows of all
documents of a file are its samples. BPB per `pile_set_name` = Σ window NLL (nats) / Σ UTF-8 bytes / ln 2.

Caveat: the released data (`test_tokenized.jsonl`, made by the original's `tools/tokenize_pile.py`) holds
`text` ids from icetk. As the original, `text` is used whenever present, so those files are only valid with
the icetk tokenizer (ids outside the model's vocabulary are an error here); for another tokenizer, drop the
`text` field so that `text_pretokenized` is re-tokenized (BPB, being per byte, stays comparable).

Differences from the original:

* The result is stored flat ("BPB ArXiv", ...) plus "BPB overall" (Σ all NLL / Σ all bytes / ln 2, not in
  the original), so that the JSON report can aggregate it. The group report prints the original's block
  (`Finish group ...:` then `{category} = {value:.3f}` lines), followed by an `overall` line.
* The group report pools the sums of all the group's files; the original printed the first file's result.
* `--limit N` keeps the first N windows of a file; a document cut short counts its bytes pro rata by the
  tokens scored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from glm.evaluation.config import BaseConfig
from glm.evaluation.dataset import LanguageModelWindow, language_model_windows, read_jsonl
from glm.evaluation.metrics import Examples, Metric, bits_per_byte
from glm.evaluation.report import FileResult, format_category_report
from glm.evaluation.tasks import EvalDataset, LanguageModelTask

OVERALL = "overall"


def category_sums(losses: list[float], examples: Examples) -> dict[str, tuple[float, float]]:
    """{pile_set_name: (Σ window NLL, Σ UTF-8 bytes)}; `examples` as for `bits_per_byte`."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    start = 0
    for item in examples:
        name = item["meta"]["pile_set_name"]
        sums[name][0] += math.fsum(losses[start : start + item["num_sequences"]])
        sums[name][1] += item["utf8_length"]
        start += item["num_sequences"]
    if start != len(losses):
        raise ValueError(f"{len(losses)} window losses for {start} windows")
    return {name: (loss, length) for name, (loss, length) in sums.items()}


def _bpb(loss: float, length: float) -> float:
    return loss / length / math.log(2) if length else math.nan


def pile_metric(losses: list[float], examples: Examples) -> dict[str, float]:
    """{"BPB <pile_set_name>": ...} (the original's `calculate_bpb_score`) and "BPB overall"."""
    result = {f"BPB {name}": value for name, value in bits_per_byte(losses, examples).items()}
    sums = category_sums(losses, examples).values()
    result[f"BPB {OVERALL}"] = _bpb(math.fsum(s[0] for s in sums), sum(s[1] for s in sums))
    return result


def check_pile_item(item: dict[str, Any], where: str) -> None:
    """A document needs `text_pretokenized` (the bytes BPB divides by), `meta.pile_set_name`, and `text`
    as token ids where given."""
    if not isinstance(item.get("text_pretokenized"), str):
        raise ValueError(f"{where}: 'text_pretokenized' (the text BPB divides by) is missing")
    if "text" in item and not (isinstance(item["text"], list) and all(type(t) is int for t in item["text"])):
        raise ValueError(f"{where}: 'text' must be a list of token ids")
    if not isinstance((item.get("meta") or {}).get("pile_set_name"), str):
        raise ValueError(f"{where}: 'meta.pile_set_name' is missing")


class Pile(LanguageModelTask):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sums: dict[str, dict[str, tuple[float, float]]] = {}  # file -> category_sums, for the report

    @property
    def metrics(self) -> dict[str, Metric]:
        return {"BPB": Metric("BPB", pile_metric, higher_is_better=False)}

    @classmethod
    def check_file(cls, config: BaseConfig, path: Path) -> None:
        for number, item in enumerate(read_jsonl(path), start=1):
            check_pile_item(item, f"{path}:{number}")

    def build_dataset(self, path: Path) -> EvalDataset:
        windows: list[LanguageModelWindow] = []
        data: list[dict[str, Any]] = []
        vocab = self.model.config.vocab_size
        for number, item in enumerate(read_jsonl(path), start=1):
            where = f"{path}:{number}"
            if "text" in item and not item["text"]:
                continue  # as the original: empty documents are skipped
            check_pile_item(item, where)
            raw = item["text_pretokenized"]
            ids = item["text"] if "text" in item else self.tokenizer.tokenize(raw)
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(
                    f"{where}: 'text' holds ids outside the vocabulary ({vocab}); pre-tokenized Pile ids are "
                    "icetk's: drop 'text' to re-tokenize 'text_pretokenized'"
                )
            if not ids:
                continue
            try:
                doc = language_model_windows(
                    ids, self.max_seq_length, self.config.generation_length, self.config.unidirectional
                )
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
            length = len(raw.encode("utf-8"))
            if self.limit is not None and len(windows) + len(doc) > self.limit:
                kept = doc[: self.limit - len(windows)]
                length *= sum(len(w.text) for w in kept) / sum(len(w.text) for w in doc)
                doc = kept
            if doc:
                windows += doc
                data.append({"num_sequences": len(doc), "utf8_length": length, "meta": item["meta"]})
            if self.limit is not None and len(windows) >= self.limit:
                break
        return EvalDataset(windows, data)

    def evaluate_file(self, path: Path) -> tuple[dict[str, Any], int, list[Any], EvalDataset]:
        result, count, predictions, dataset = super().evaluate_file(path)
        self._sums[str(path.relative_to(self.folder))] = category_sums(predictions, dataset.data)
        return dict(result["BPB"]), count, predictions, dataset

    def report_single_metrics(self, file: str, result: dict[str, Any]) -> None:
        return None  # as the original: everything is printed per group

    def report_group_metrics(self, group: str, results: dict[str, FileResult], level: int = 1) -> None:
        """The original's per-category block (pooled over the group's files), then an `overall` line."""
        sums = getattr(self, "_sums", {})
        if results and all(file in sums for file in results):
            pooled: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for file in results:
                for name, (loss, length) in sums[file].items():
                    pooled[name][0] += loss
                    pooled[name][1] += length
            values = {name: _bpb(loss, length) for name, (loss, length) in pooled.items()}
            values[OVERALL] = _bpb(sum(v[0] for v in pooled.values()), sum(v[1] for v in pooled.values()))
        else:  # results without the sums (e.g. loaded from elsewhere): the first file's, as the original
            first = next(iter(results.values()), ({}, 0))[0]
            values = {key.removeprefix("BPB "): value for key, value in first.items()}
            values[OVERALL] = values.pop(OVERALL, math.nan)
        print(format_category_report(group, values))

    def report_overall_metrics(self, results: dict[str, FileResult]) -> None:
        return None

    def prediction_record(self, prediction: Any, item: dict[str, Any], sample: Any) -> dict[str, Any]:
        return {"tokens": len(sample.text), "context_tokens": len(sample.prompt), "loss": prediction}
