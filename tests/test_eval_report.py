"""Group aggregation and the original report lines."""

from __future__ import annotations

import math

import pytest

from glm.evaluation.report import (
    TASK_DONE,
    format_category_report,
    format_file_result,
    format_group_report,
    group_stats,
)

# Three prompt files of one group: accuracy 60 on 10 items, 80 on 30, 70 on 60.
# max = 80, median = 70, average = (60·10 + 80·30 + 70·60) / 100 = 7200 / 100 = 72
GROUP = {
    "p1/validation.jsonl": ({"Accuracy": 60.0}, 10),
    "p2/validation.jsonl": ({"Accuracy": 80.0}, 30),
    "p3/validation.jsonl": ({"Accuracy": 70.0}, 60),
}


def test_group_stats() -> None:
    assert group_stats(GROUP) == {"Accuracy": {"max": 80.0, "median": 70.0, "average": 72.0}}
    # even count: median is the mean of the middle two; (60·1 + 80·3) / 4 = 75
    two = {"a": ({"EM": 60.0}, 1), "b": ({"EM": 80.0}, 3)}
    assert group_stats(two)["EM"] == {"max": 80.0, "median": 70.0, "average": 75.0}
    assert group_stats({}) == {}


def test_group_stats_edge_cases() -> None:
    assert math.isnan(group_stats({"a": ({"EM": 0.0}, 0)})["EM"]["average"])
    with pytest.raises(TypeError, match="metric BPB of a is dict"):
        group_stats({"a": ({"BPB": {"ArXiv": 1.0}}, 3)})


def test_file_line() -> None:
    line = format_file_result("p1/validation.jsonl", {"EM": 12.34567, "F1": 50.0})
    assert line == "        Finish p1/validation.jsonl, EM = 12.346, F1 = 50.000"


def test_group_lines() -> None:
    assert format_group_report("validation", GROUP) == (
        "    Group validation Accuracy: max = 80.000, median = 70.000, average = 72.000"
    )
    two_metrics = {"a": ({"EM": 10.0, "F1": 20.0}, 1), "b": ({"EM": 30.0, "F1": 40.0}, 1)}
    assert format_group_report("test", two_metrics).split("\n") == [
        "      Group test: ",
        "        Metric EM: max = 30.000, median = 20.000, average = 20.000",
        "        Metric F1: max = 40.000, median = 30.000, average = 30.000",
    ]
    assert format_group_report("Overall", GROUP, level=0).startswith("Group Overall Accuracy: max = 80.000")


def test_other_lines() -> None:
    assert format_category_report("test", {"ArXiv": 0.5, "Github": 0.86562}) == (
        "    Finish group test:\n        ArXiv = 0.500\n        Github = 0.866\n"
    )
    assert TASK_DONE.format(name="glue_cola", seconds=101.23) == "Finish task glue_cola in 101.2s."
