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

from tqdm import tqdm

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
    generate_samples,
    generation_samples,
    language_model_document,
    language_model_windows,
    multiple_choice_logprobs,
    multiple_choice_samples,
    read_jsonl,
    window_losses,
)
from glm.evaluation.metrics import Metric, get_metrics
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
from glm.strategies import BaseStrategy, BeamSearchStrategy
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

    @abstractmethod
    def build_dataset(self, path: Path) -> EvalDataset: ...

    @abstractmethod
    def predict_single_batch(self, batch: list[Any]) -> list[Any]: ...

    def prediction_record(self, prediction: Any, item: dict[str, Any]) -> dict[str, Any]:
        """What `--save-predictions` writes for one sample."""
        return {"prediction": prediction}

    def evaluate_file(self, path: Path) -> tuple[dict[str, Any], int, list[Any], EvalDataset]:
        dataset = self.build_dataset(path)
        size = self.config.micro_batch_size
        batches = [dataset.samples[i : i + size] for i in range(0, len(dataset.samples), size)]
        predictions: list[Any] = []
        name = str(path.relative_to(self.folder))
        for batch in tqdm(batches, desc=name, unit="batch", leave=False, disable=None, file=sys.stderr):
            predictions += self.predict_single_batch(batch)
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
                    items = dataset.data if len(dataset.data) == len(predictions) else [{}] * len(predictions)
                    for index, (prediction, item) in enumerate(zip(predictions, items, strict=True)):
                        record = {"task": self.config.name, "group": group, "file": name, "index": index}
                        records.append(record | self.prediction_record(prediction, item))
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


class MultiChoiceTask(BaseTask):
    """`type: mul`: the prediction is the choice with the largest summed log-prob."""

    config_class = MultiChoiceTaskConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.use_multitask_encoding:
            raise ConfigError(f"task '{self.config.name}': use_multitask_encoding is not supported")

    def build_dataset(self, path: Path) -> EvalDataset:
        items = self._items(path)
        try:
            samples = multiple_choice_samples(
                items, self.tokenizer, self.max_seq_length, self.config.use_task_mask
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return EvalDataset(samples, items)

    def predict_single_batch(self, batch: list[MultiChoiceSample]) -> list[int]:
        scores = multiple_choice_logprobs(self.model, batch, self.tokenizer.sop_id)
        return [max(range(len(s)), key=s.__getitem__) for s in scores]

    def prediction_record(self, prediction: Any, item: dict[str, Any]) -> dict[str, Any]:
        return {"prediction": prediction, "label": item.get("label")}


class GenerationTask(BaseTask):
    """`type: gen`: greedy (top-1) or deterministic beam search; the prediction is the best beam's text."""

    config_class = GenerationTaskConfig
    config: GenerationTaskConfig

    def build_strategy(self, batch_size: int) -> BaseStrategy | BeamSearchStrategy:
        """The original's strategies; end tokens are [eop, eos]."""
        end = self.tokenizer.end_ids
        if self.config.sampling_strategy == "BaseStrategy":
            return BaseStrategy(batch_size, temperature=1.0, top_k=1, end_tokens=end)
        return BeamSearchStrategy(
            batch_size,
            self.config.num_beams,
            length_penalty=self.config.length_penalty,
            consider_end=True,
            end_tokens=end,
            no_repeat_ngram_size=self.config.no_repeat_ngram_size,
            min_gen_length=self.config.min_gen_length,
            deterministic=True,
        )

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
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        data = []
        for item, sample in zip(items, samples, strict=True):
            texts = item.get("targets_pretokenized")
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

    def prediction_record(self, prediction: Any, item: dict[str, Any]) -> dict[str, Any]:
        return {"prediction": prediction, "targets": item.get("targets")}


class LanguageModelTask(BaseTask):
    """`type: lm`: one raw-text document per file, scored in sliding windows; word-level PPL."""

    config_class = LanguageModelTaskConfig
    config: LanguageModelTaskConfig

    def build_dataset(self, path: Path) -> EvalDataset:
        ids, item = language_model_document(path, self.tokenizer)
        try:
            windows = language_model_windows(
                ids, self.max_seq_length, self.config.generation_length, self.config.unidirectional
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if self.limit is not None and self.limit < len(windows):
            # --limit: divide by the words of the part scored (pro rata by tokens), not the whole file's.
            kept = sum(len(w.text) for w in windows[: self.limit])
            item["num_original_tokens"] *= kept / sum(len(w.text) for w in windows)
            windows = windows[: self.limit]
        return EvalDataset(windows, [item])

    def predict_single_batch(self, batch: list[LanguageModelWindow]) -> list[float]:
        mask_id = self.tokenizer.get_command("[gMASK]" if self.config.use_task_mask else "[MASK]")
        return window_losses(self.model, batch, mask_id, self.tokenizer.sop_id)

    def prediction_record(self, prediction: Any, item: dict[str, Any]) -> dict[str, Any]:
        return {"loss": prediction}


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
