"""Evaluation task configs: the original GLM-130B YAML schema (`evaluation/configs.py`), loaded strictly.

Keys may be written in kebab-case or snake_case (`micro-batch-size` = `micro_batch_size`), as the original's
dataclass_wizard loader allowed. Unlike the original, an unknown key, a missing required key, a value of the
wrong type and malformed YAML are errors that name the file.
"""

from __future__ import annotations

import difflib
import glob
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from glm.evaluation.metrics import METRICS

SAMPLING_STRATEGIES = ("BaseStrategy", "BeamSearchStrategy")


class ConfigError(ValueError):
    """A task config that cannot be used; the message names the file."""


class TaskType(str, Enum):
    MULTICHOICE = "mul"
    GENERATION = "gen"
    LANGUAGE_MODEL = "lm"
    OTHER = "other"  # no default task class: needs `module`


def _did_you_mean(word: str, options: list[str], what: str) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"valid {what}: {', '.join(options)}"


@dataclass
class BaseConfig:
    """Fields every task type has (the original's `BaseConfig`)."""

    name: str  # task name
    type: TaskType  # mul / gen / lm / other
    path: str  # data folder, relative to the data root
    module: str | None = None  # dotted path of a custom task class, e.g. "tasks.lambada.task.LAMBADA"
    metrics: list[str] = field(default_factory=list)  # keys of METRICS
    use_task_mask: bool = False  # [gMASK] instead of [MASK]
    use_multitask_encoding: bool = False  # multiple choice: [MASK] blocks count positions up from the mask
    unidirectional: bool = False  # causal attention over the context
    max_seq_length: int = 2048  # truncation limit (left truncation)
    file_pattern: str | dict[str, str] = "**/*.json*"  # glob under `path`; a dict defines named groups
    micro_batch_size: int = 1  # per-replica batch size

    def __post_init__(self) -> None:
        self.type = TaskType(self.type)
        if self.unidirectional and not self.use_task_mask:
            raise ValueError("[MASK] doesn't support unidirectional attention (set use_task_mask: true)")
        if self.max_seq_length < 1 or self.micro_batch_size < 1:
            raise ValueError("max_seq_length and micro_batch_size must be at least 1")
        if isinstance(self.file_pattern, dict) and not self.file_pattern:
            raise ValueError("file_pattern has no groups")


@dataclass
class MultiChoiceTaskConfig(BaseConfig):
    """`type: mul`: scored by the log-probability of each choice."""

    metrics: list[str] = field(default_factory=lambda: ["Accuracy"])


@dataclass
class GenerationTaskConfig(BaseConfig):
    """`type: gen`: generated text compared with the targets. End tokens are always [eop, eos]."""

    metrics: list[str] = field(default_factory=lambda: ["EM", "F1"])
    sampling_strategy: str = "BaseStrategy"  # greedy; or "BeamSearchStrategy" (deterministic)
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            hint = _did_you_mean(self.sampling_strategy, list(SAMPLING_STRATEGIES), "strategies")
            raise ValueError(f"unknown sampling_strategy '{self.sampling_strategy}'; {hint}")
        if self.num_beams < 1 or self.max_gen_length < 1 or self.min_gen_length < 0:
            raise ValueError("num_beams and max_gen_length must be at least 1, min_gen_length at least 0")


@dataclass
class LanguageModelTaskConfig(BaseConfig):
    """`type: lm`: perplexity over sliding windows."""

    metrics: list[str] = field(default_factory=lambda: ["PPL"])
    generation_length: int = 256  # new tokens scored per window

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generation_length < 1:
            raise ValueError("generation_length must be at least 1")


CONFIG_CLASSES: dict[TaskType, type[BaseConfig]] = {
    TaskType.MULTICHOICE: MultiChoiceTaskConfig,
    TaskType.GENERATION: GenerationTaskConfig,
    TaskType.LANGUAGE_MODEL: LanguageModelTaskConfig,
    TaskType.OTHER: BaseConfig,
}


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    if get_origin(hint) in (list, dict):
        return f"{get_origin(hint).__name__}[{', '.join(_type_name(arg) for arg in get_args(hint))}]"
    return hint.__name__


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's type hint (bool is not an int here; an int is a float)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: malformed YAML: {' '.join(problem.split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> BaseConfig:
    """A config of the class for `data["type"]`; `source` (the file) is named in every error."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field name -> key as written
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise ConfigError(f"{source}: key '{key}' repeats '{spelled[name]}'")
        values[name], spelled[name] = value, str(key)

    if "type" not in values:
        raise ConfigError(f"{source}: missing required key 'type'")
    kinds = [t.value for t in TaskType]
    if values["type"] not in kinds:
        hint = _did_you_mean(str(values["type"]), kinds, "types")
        raise ConfigError(f"{source}: key 'type' is {values['type']!r}; {hint}")
    cls = CONFIG_CLASSES[TaskType(values["type"])]

    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for name, key in spelled.items():
        if name not in known:
            options = [k.replace("_", "-") for k in known] if "-" in key else known
            hint = _did_you_mean(key, options, "keys")
            raise ConfigError(f"{source}: unknown key '{key}' for a '{values['type']}' task; {hint}")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values:
            raise ConfigError(f"{source}: missing required key '{f.name}'")
    for name, value in values.items():
        if name != "type" and not _matches(value, hints[name]):
            raise ConfigError(
                f"{source}: key '{spelled[name]}' expects {_type_name(hints[name])}, "
                f"got {type(value).__name__} ({value!r})"
            )
        if hints[name] is float:
            values[name] = float(value)

    try:
        config = cls(**values)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    if config.type is TaskType.OTHER and not config.module:
        raise ConfigError(f"{source}: type 'other' has no default task class; set 'module'")
    if not config.module:  # a custom module may register its own metrics when imported, so check later
        for metric in config.metrics:
            if metric not in METRICS:
                hint = _did_you_mean(metric, list(METRICS), "metrics")
                raise ConfigError(f"{source}: unknown metric '{metric}'; {hint}")
    return config


def load_task_config(path: Path | str) -> BaseConfig:
    """Read one task YAML into the config class for its `type`."""
    path = Path(path)
    return config_from_dict(_read_yaml(path), source=str(path))


def collect_task_files(paths: list[str]) -> list[Path]:
    """Task YAMLs from files and folders: each folder is searched recursively for *.yaml and *.yml
    (hidden entries skipped, as glob does), sorted; argument order is kept and repeats are dropped.
    """
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.suffix in (".yaml", ".yml")
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.append(path)
        else:  # the original silently skipped a path that did not exist
            raise FileNotFoundError(f"task config path '{arg}' does not exist")
    return list(dict.fromkeys(found))


def resolve_file_groups(config: BaseConfig, data_root: Path) -> dict[str, list[Path]]:
    """Data files per group: `file_pattern` globbed (recursively, sorted) under `data_root / config.path`.

    A string pattern is one group named "all", as the original. A pattern matching no file is an error
    (the original evaluated an empty group silently).
    """
    folder = Path(data_root) / config.path
    if not folder.is_dir():
        raise FileNotFoundError(f"task '{config.name}': data folder {folder} does not exist")
    patterns = {"all": config.file_pattern} if isinstance(config.file_pattern, str) else config.file_pattern
    groups: dict[str, list[Path]] = {}
    for group, pattern in patterns.items():
        matches = sorted(glob.glob(pattern, root_dir=folder, recursive=True))
        groups[group] = [folder / m for m in matches if (folder / m).is_file()]
        if not groups[group]:
            raise FileNotFoundError(
                f"task '{config.name}': file pattern '{pattern}' (group '{group}') "
                f"matched no file in {folder}"
            )
    return groups
