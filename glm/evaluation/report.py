"""Result aggregation and the original evaluator's report lines (`evaluation/tasks.py`, `evaluate.py`).

A file's result is `(metric values, number of samples)`; a group is a mapping file -> result. The strings
below reproduce the original's stdout byte for byte (including its odd spacing).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

FileResult = tuple[Mapping[str, float], int]

# Lines printed around the per-file results, as str.format templates.
TASKS_LOADED = "> Successfully load {count} task{s}"  # s = "s" if count > 1 else ""
TASK_LOADED = "    Task {name} loaded from config {path}"
TASK_START = "Evaluating task {name}:"  # preceded by a blank-line print and the config's repr
GROUP_START = "    Evaluating group {group}:"
TASK_RESULTS = "Evaluation results of task {name}:"
TASK_DONE = "Finish task {name} in {seconds:.1f}s."
ALL_DONE = "Finish {count} task{s} in {seconds:.1f}s"  # s = "s" if count > 1 else ""


def group_stats(results: Mapping[str, FileResult]) -> dict[str, dict[str, float]]:
    """Per metric over a group's files: `max`, `median` and the sample-weighted `average`.

    The average is NaN when the files hold no samples (NumPy raised an error there).
    """
    values: dict[str, list[tuple[float, int]]] = {}
    for file, (metrics, count) in results.items():
        for name, value in metrics.items():
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {name} of {file} is {type(value).__name__}, not a number")
            values.setdefault(name, []).append((float(value), count))
    stats = {}
    for name, pairs in values.items():
        vals = [v for v, _ in pairs]
        total = sum(w for _, w in pairs)
        average = sum(v * w for v, w in pairs) / total if total else math.nan
        stats[name] = {"max": max(vals), "median": statistics.median(vals), "average": average}
    return stats


def format_file_result(file: str, metrics: Mapping[str, float]) -> str:
    """`        Finish {file}, {metric} = {value:.3f}, ...` (the file relative to the task's data folder)."""
    return f"        Finish {file}" + "".join(f", {name} = {value:.3f}" for name, value in metrics.items())


def _stats_line(stats: Mapping[str, float]) -> str:
    return f"max = {stats['max']:.3f}, median = {stats['median']:.3f}, average = {stats['average']:.3f}"


def format_group_report(group: str, results: Mapping[str, FileResult], level: int = 1) -> str:
    """The group summary: one line for one metric, else a header and one line per metric.

    `level` is the indent in steps of four spaces; MMLU's "Overall" summary over all files uses level 0.
    """
    stats = group_stats(results)
    indent = "    " * level
    if len(stats) == 1:
        ((name, values),) = stats.items()
        return f"{indent}Group {group} {name}: {_stats_line(values)}"
    lines = [f"{indent}  Group {group}: "]
    lines += [f"{indent}    Metric {name}: {_stats_line(values)}" for name, values in stats.items()]
    return "\n".join(lines)


def format_category_report(group: str, values: Mapping[str, float]) -> str:
    """Pile's group report of a per-category metric (BPB): a header, then `{category} = {value:.3f}` lines.

    The original printed this string with a trailing newline, so a blank line follows it.
    """
    return f"    Finish group {group}:\n" + "".join(f"        {k} = {v:.3f}\n" for k, v in values.items())
