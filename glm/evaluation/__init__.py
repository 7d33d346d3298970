"""Task evaluation as in the original GLM-130B evaluator: task configs, metrics and reports."""

from glm.evaluation.config import (
    CONFIG_CLASSES,
    BaseConfig,
    ConfigError,
    GenerationTaskConfig,
    LanguageModelTaskConfig,
    MultiChoiceTaskConfig,
    TaskType,
    collect_task_files,
    config_from_dict,
    load_task_config,
    resolve_file_groups,
)
from glm.evaluation.metrics import METRICS, Metric, get_metric, get_metrics, register_metric
from glm.evaluation.report import format_file_result, format_group_report, group_stats

__all__ = [
    "CONFIG_CLASSES",
    "METRICS",
    "BaseConfig",
    "ConfigError",
    "GenerationTaskConfig",
    "LanguageModelTaskConfig",
    "Metric",
    "MultiChoiceTaskConfig",
    "TaskType",
    "collect_task_files",
    "config_from_dict",
    "format_file_result",
    "format_group_report",
    "get_metric",
    "get_metrics",
    "group_stats",
    "load_task_config",
    "register_metric",
    "resolve_file_groups",
]
