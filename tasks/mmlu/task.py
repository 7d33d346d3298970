"""The original's MMLU customisation (`tasks/mmlu/task.py`): a plain multiple-choice task that also reports an
"Overall" summary (max / median / weighted average) over all subject files of all four groups.

    module: tasks.mmlu.task.MMLU

The original also defined a `categories` dict (subject names per STEM / Other / Social Sciences /
Humanities) that nothing used; it is left out.
"""

from __future__ import annotations

from glm.evaluation.report import FileResult
from glm.evaluation.tasks import MultiChoiceTask


class MMLU(MultiChoiceTask):
    def report_overall_metrics(self, results: dict[str, FileResult]) -> None:
        self.report_group_metrics("Overall", results, level=0)
