"""Task classes of the original GLM-130B evaluator (`evaluation/tasks.py`): multiple choice, generation and
language modelling, evaluated file by file and group by group, reported in the original's format.

A custom task is a subclass named by a config's `module:` ("package.module.ClassName", imported as the
original did); it may override `build_dataset`, `predict_single_batch`, the `metrics` property and the
`report_*` methods.
"""

from __future__ import annotations

import importlib
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from glm.decoding.factory import banned_tokens, make_strategy
from glm.decoding.options import GenerationOptions
from glm.decoding.strategies import BaseStrategy, BeamSearchStrategy
from glm.distributed import data_parallel_share, gather_data_parallel
from glm.evaluation.config import (
    BaseConfig,
    ConfigError,
    GenerationTaskConfig,
    LanguageModelTaskConfig,
    MultiChoiceTaskConfig,
    TaskType,
    resolve_file_groups,
)
from glm.evaluation.dataset import (
    GenerationSample,
    LanguageModelWindow,
    MultiChoiceSample,
    check_generation_items,
    check_multiple_choice_items,
    generate_samples,
    generation_samples,
    language_model_document,
    language_model_windows,
    multiple_choice_samples,
    read_jsonl,
    read_text,
)
from glm.evaluation.metrics import LM_COUNTS, Metric, get_metrics
from glm.evaluation.progress import Progress
from glm.evaluation.report import (
    GROUP_START,
    TASK_DONE,
    TASK_RESULTS,
    TASK_START,
    FileResult,
    format_file_result,
    format_group_report,
    group_stats,
)
from glm.model import GLM
from glm.scoring import choice_scores, window_losses, window_row
from glm.tokenizer import GLMTokenizer


@dataclass
class EvalDataset:
    """One data file: the samples fed to the model, and the items (dicts) the metrics read."""

    samples: list[Any]
    data: list[dict[str, Any]]


@dataclass
class TaskResult:
    """Everything one task produced: per file (relative to the data folder) its metrics and sample count."""

    name: str
    config: dict[str, Any]
    groups: dict[str, dict[str, FileResult]]
    seconds: float
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "groups": {
                group: {
                    "files": {f: {"metrics": dict(m), "samples": n} for f, (m, n) in files.items()},
                    "stats": group_stats(files),
                }
                for group, files in self.groups.items()
            },
            "seconds": round(self.seconds, 3),
        }


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def warn(message: str) -> None:
    """A one-line warning on stderr (`warning: ...`)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class BaseTask(ABC):
    """Evaluate every file of every group of one task config (the original's `BaseTask`)."""

    config_class: type[BaseConfig] = BaseConfig

    def __init__(
        self,
        model: GLM,
        tokenizer: GLMTokenizer,
        config: BaseConfig,
        data_root: Path | str,
        limit: int | None = None,
        save_predictions: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.data_root = Path(data_root)
        self.limit = limit  # first N items (LM: windows) of each file; not in the original
        self.save_predictions = save_predictions
        self.file_groups = resolve_file_groups(config, self.data_root)
        config.metrics = list(self.metrics)  # as the original: what is printed is what `metrics` gives
        model_max = model.config.max_sequence_length
        if config.max_seq_length > model_max:  # the original lowered it silently
            warn(
                f"task '{config.name}': max_seq_length {config.max_seq_length} is above the model's maximum "
                f"sequence length {model_max}; using {model_max}"
            )

    @property
    def metrics(self) -> dict[str, Metric]:
        return get_metrics(self.config.metrics)

    @property
    def max_seq_length(self) -> int:
        """The config's limit, capped by the model's maximum sequence length."""
        return min(self.config.max_seq_length, self.model.config.max_sequence_length)

    @property
    def folder(self) -> Path:
        return self.data_root / self.config.path

    @classmethod
    def check_file(cls, config: BaseConfig, path: Path) -> None:
        """Raise ValueError naming the file (and item) if its data cannot be evaluated; runs before the
        model is loaded. The default reads the jsonl; task types check their items."""
        read_jsonl(path)

    @abstractmethod
    def build_dataset(self, path: Path) -> EvalDataset: ...

    @abstractmethod
    def predict_single_batch(self, batch: list[Any]) -> list[Any]: ...

    def prediction_record(self, prediction: Any, item: dict[str, Any], sample: Any) -> dict[str, Any]:
        """What `--save-predictions` writes for one sample."""
        return {"prediction": prediction}

    def evaluate_file(self, path: Path) -> tuple[dict[str, Any], int, list[Any], EvalDataset]:
        dataset = self.build_dataset(path)
        size = self.config.micro_batch_size
        samples = data_parallel_share(dataset.samples)  # this replica's (all, without data parallelism)
        batches = [samples[i : i + size] for i in range(0, len(samples), size)]
        predictions: list[Any] = []
        progress = Progress(f"{self.config.name} {path.relative_to(self.folder)}", len(samples))
        for batch in batches:
            predictions += self.predict_single_batch(batch)
            progress.update(len(batch))
        progress.close()
        # Every replica's predictions and samples (with what predicting stored on them), in order.
        pairs = gather_data_parallel(list(zip(predictions, samples, strict=True)), len(dataset.samples))
        predictions, dataset.samples = [p for p, _ in pairs], [s for _, s in pairs]
        result = {key: metric(predictions, dataset.data) for key, metric in self.metrics.items()}
        return result, len(dataset.samples), predictions, dataset

    def evaluate(self) -> TaskResult:
        """Every file of every group; prints the original's lines and returns the results."""
        start = time.time()
        self.model.eval()
        print("\n")
        print(self.config)
        print(TASK_START.format(name=self.config.name))
        results: dict[str, dict[str, FileResult]] = {}
        records: list[dict[str, Any]] = []
        for group, files in self.file_groups.items():
            print(GROUP_START.format(group=group))
            results[group] = {}
            for path in files:
                result, count, predictions, dataset = self.evaluate_file(path)
                name = str(path.relative_to(self.folder))
                results[group][name] = (result, count)
                if self.save_predictions:
                    per_sample = len(dataset.data) == len(predictions)
                    for index, (prediction, sample) in enumerate(
                        zip(predictions, dataset.samples, strict=True)
                    ):
                        item = dataset.data[index] if per_sample else {}
                        record = {"task": self.config.name, "group": group, "file": name, "index": index}
                        records.append(record | self.prediction_record(prediction, item, sample))
                self.report_single_metrics(name, result)
        print(TASK_RESULTS.format(name=self.config.name))
        for group, group_results in results.items():
            self.report_group_metrics(group, group_results)
        self.report_overall_metrics({k: v for group in results.values() for k, v in group.items()})
        seconds = time.time() - start
        print(TASK_DONE.format(name=self.config.name, seconds=seconds))
        config = {k: _plain(v) for k, v in asdict(self.config).items()}
        return TaskResult(self.config.name, config, results, seconds, records)

    def report_single_metrics(self, file: str, result: dict[str, Any]) -> None:
        print(format_file_result(file, result))

    def report_group_metrics(self, group: str, results: dict[str, FileResult], level: int = 1) -> None:
        print(format_group_report(group, results, level))

    def report_overall_metrics(self, results: dict[str, FileResult]) -> None:
        """Nothing by default, as the original (MMLU printed an "Overall" group here)."""
        return None

    def _items(self, path: Path) -> list[dict[str, Any]]:
        return read_jsonl(path)[: self.limit]

    def _text(self, value: Any) -> Any:
        """Ids as text for a prediction record; strings (and lists of them) as they are."""
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return self.tokenizer.detokenize(value)
        if isinstance(value, list):
            return [self._text(v) for v in value]
        return value


class MultiChoiceTask(BaseTask):
    """`type: mul`: the prediction is the choice with the largest summed log-prob."""

    config_class = MultiChoiceTaskConfig

    @classmethod
    def check_file(cls, config: BaseConfig, path: Path) -> None:
        check_multiple_choice_items(read_jsonl(path), path)

    def encode_inputs(self, text: str) -> list[int]:
        """`inputs_pretokenized` as ids: plain text, as the original (a written "[MASK]" is text)."""
        return self.tokenizer.tokenize(text)

    def build_dataset(self, path: Path) -> EvalDataset:
        items = self._items(path)
        try:
            samples = multiple_choice_samples(
                items,
                self.tokenizer,
                self.max_seq_length,
                self.config.use_task_mask,
                self.config.use_multitask_encoding,
                encode=self.encode_inputs,
                vocab_size=self.model.config.vocab_size,
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return EvalDataset(samples, items)

    def score(self, batch: list[MultiChoiceSample]) -> list[list[float]]:
        """Every choice's summed log-prob, one packed row per sample; also kept on the samples."""
        scores = choice_scores(self.model, [sample.row for sample in batch])
        for sample, sample_scores in zip(batch, scores, strict=True):
            sample.scores = sample_scores
        return scores

    def predict_single_batch(self, batch: list[MultiChoiceSample]) -> list[int]:
        return [max(range(len(s)), key=s.__getitem__) for s in self.score(batch)]

    def prediction_record(self, prediction: Any, item: dict[str, Any], sample: Any) -> dict[str, Any]:
        return {
            "input": item.get("inputs_pretokenized", self._text(item.get("inputs"))),
            "choices": item.get("choices_pretokenized", self._text(item.get("choices"))),
            "scores": sample.scores,
            "prediction": prediction,
            "label": item.get("label"),
        }


class GenerationTask(BaseTask):
    """`type: gen`: greedy (top-1) or deterministic beam search; the prediction is the best beam's text."""

    config_class = GenerationTaskConfig
    config: GenerationTaskConfig

    @classmethod
    def check_file(cls, config: BaseConfig, path: Path) -> None:
        check_generation_items(read_jsonl(path), path)

    def build_strategy(self, batch_size: int) -> BaseStrategy | BeamSearchStrategy:
        """The original's strategies (greedy, or deterministic beam search); end tokens are [eop, eos], and
        no mask or padding id is generated, as in blank filling (the original's evaluator allowed them)."""
        if self.config.sampling_strategy == "BaseStrategy":
            options = GenerationOptions(temperature=1.0, top_k=1, top_p=0.0)
        else:
            options = GenerationOptions(
                "BeamSearchStrategy",
                num_beams=self.config.num_beams,
                length_penalty=self.config.length_penalty,
                no_repeat_ngram_size=self.config.no_repeat_ngram_size,
                min_gen_length=self.config.min_gen_length,
                deterministic=True,
            )
        return make_strategy(options, batch_size, self.tokenizer.end_ids, banned_tokens(self.tokenizer))

    def build_dataset(self, path: Path) -> EvalDataset:
        items = self._items(path)
        try:
            samples = generation_samples(
                items,
                self.tokenizer,
                self.max_seq_length,
                self.config.max_gen_length,
                self.config.use_task_mask,
                self.config.unidirectional,
                vocab_size=self.model.config.vocab_size,
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        data = []
        for item, sample in zip(items, samples, strict=True):
            texts = item.get("targets_pretokenized")
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list):
                texts = [self.tokenizer.detokenize(t) for t in sample.targets]
            data.append({**item, "targets": texts})
        return EvalDataset(samples, data)

    def generate(self, batch: Sequence[GenerationSample]) -> list[list[list[int]]]:
        """All beams (best first) of every sample: generated ids without the end token."""
        strategy = self.build_strategy(len(batch))
        return generate_samples(
            self.model, batch, strategy, self.config.max_gen_length, self.tokenizer.end_ids
        )

    def predict_single_batch(self, batch: list[GenerationSample]) -> list[str]:
        return [self.tokenizer.detokenize(beams[0]) for beams in self.generate(batch)]

    def prediction_record(self, prediction: Any, item: dict[str, Any], sample: Any) -> dict[str, Any]:
        return {
            "input": item.get("inputs_pretokenized", self._text(item.get("inputs"))),
            "targets": item.get("targets"),
            "prediction": prediction,
        }


class LanguageModelTask(BaseTask):
    """`type: lm`: one raw-text document per file, scored in sliding windows.

    Reports the original's word-count perplexity (`PPL`: Σ NLL / space-separated words, so a Chinese text
    of few spaces gets a huge number), and always also `PPL_token` (per scored token) and `BPB_text` (bits
    per UTF-8 byte), which compare across texts and tokenizers.
    """

    config_class = LanguageModelTaskConfig
    config: LanguageModelTaskConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: dict[str, dict[str, float]] = {}  # file -> what each metric divided by
        limit = self.max_seq_length - 1
        if self.config.generation_length > limit and not self.config.unidirectional:
            warn(
                f"task '{self.config.name}': generation_length {self.config.generation_length} is above "
                f"max_seq_length - 1 = {limit}; using {limit} (the original skipped the tokens in between)"
            )
            self.config.generation_length = limit

    @property
    def metrics(self) -> dict[str, Metric]:
        names = list(dict.fromkeys([*self.config.metrics, *LM_COUNTS]))
        return get_metrics(names)

    @classmethod
    def check_file(cls, config: BaseConfig, path: Path) -> None:
        read_text(path)

    def build_dataset(self, path: Path) -> EvalDataset:
        ids, item = language_model_document(path, self.tokenizer)
        try:
            windows = language_model_windows(
                ids, self.max_seq_length, self.config.generation_length, self.config.unidirectional
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        scored = sum(len(w.text) for w in windows)
        if self.limit is not None and self.limit < len(windows):
            # --limit: divide by the part scored (words and bytes pro rata by tokens), not the whole file's.
            kept = sum(len(w.text) for w in windows[: self.limit])
            item["num_original_tokens"] *= kept / scored
            item["utf8_length"] *= kept / scored
            windows, scored = windows[: self.limit], kept
        item["num_tokens"] = scored
        self.counts[str(path.relative_to(self.folder))] = item
        return EvalDataset(windows, [item])

    def predict_single_batch(self, batch: list[LanguageModelWindow]) -> list[float]:
        mask_id = self.tokenizer.get_command("[gMASK]" if self.config.use_task_mask else "[MASK]")
        sop = self.tokenizer.sop_id
        return window_losses(
            self.model, [window_row(w.prompt, w.text, mask_id=mask_id, sop_id=sop) for w in batch]
        )

    def report_single_metrics(self, file: str, result: dict[str, Any]) -> None:
        super().report_single_metrics(file, result)
        counts = self.counts.get(file)
        if counts is not None and set(LM_COUNTS) <= set(result):
            print(
                f"          (PPL per {counts['num_original_tokens']:g} space-separated words, as the "
                f"original; PPL_token per {counts['num_tokens']:g} tokens; BPB_text per "
                f"{counts['utf8_length']:g} UTF-8 bytes)"
            )

    def prediction_record(self, prediction: Any, item: dict[str, Any], sample: Any) -> dict[str, Any]:
        return {"tokens": len(sample.text), "context_tokens": len(sample.prompt), "loss": prediction}


DEFAULT_CLASSES: dict[TaskType, type[BaseTask]] = {
    TaskType.MULTICHOICE: MultiChoiceTask,
    TaskType.GENERATION: GenerationTask,
    TaskType.LANGUAGE_MODEL: LanguageModelTask,
}


def task_class(config: BaseConfig) -> type[BaseTask]:
    """The class for a config: `module` ("package.module.ClassName") if set, else the type's default."""
    if not config.module:
        return DEFAULT_CLASSES[config.type]
    module_name, _, class_name = config.module.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"task '{config.name}': cannot import module '{config.module}': {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise ConfigError(f"task '{config.name}': '{config.module}' is not a task class")
    return cls
