"""Fine-tuning examples: a blank to fill, laid out exactly as generation and the evaluator lay it out.

An example is a bidirectional context holding the mask being filled, and the blank's tokens. As a training
sample (glm.objective.Sample) it is `context + [sop] + blank`, the loss on `blank + [eop]`: the block sees
the whole context and itself causally, and takes the mask's position for `[MASK]`/`[sMASK]` or positions
continuing after the context for `[gMASK]` (glm/query.py). That is the row glm.decoding.infill generates
from (`prepare_query`'s ids + `sop`) and the row the evaluator scores a choice or target in
(glm.scoring.choice_row, glm.evaluation.dataset.build_generation_sample).

Sources:
* a JSON-lines file of {"prompt": str, "completion": str}: the prompt is prepared as generation prepares it
  (`prepare_query`: `[MASK]` > `[sMASK]` > `[gMASK]`, `[gMASK]` appended when it has no mask); the
  completion fills the first mask of that kind (encoded as text after a mask, as the evaluator's choices);
* a task YAML of the evaluator's schema: the items of a file, through the task's own class (so a custom
  `module:` encodes them as it does when evaluating); multiple choice trains on the correct choice,
  generation on the first target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glm.decoding.infill import prepare_query
from glm.evaluation.config import TaskType, load_task_config, resolve_file_groups
from glm.evaluation.dataset import GenerationSample, MultiChoiceSample, read_utf8
from glm.evaluation.tasks import task_class
from glm.model import GLM
from glm.objective import IGNORE, Sample
from glm.tokenizer import GLMTokenizer


@dataclass(frozen=True)
class Prompt:
    """One line of a JSON-lines file, checked but not yet tokenized."""

    prompt: str
    completion: str
    where: str  # FILE:LINE, for errors


@dataclass(frozen=True)
class Example:
    context: list[int]  # bidirectional part, holding the mask filled
    mask_position: int | None  # the filled [MASK]/[sMASK]; None for [gMASK] (positions continue)
    blank: list[int]  # the blank's tokens
    where: str

    def sample(self, sop: int, eop: int) -> Sample:
        """The training sample: `context + [sop] + blank`, labels `blank + [eop]` (see the module doc)."""
        n, m = len(self.context), len(self.blank) + 1
        tokens = [*self.context, sop, *self.blank]
        positions = list(range(n)) + (
            list(range(n, n + m)) if self.mask_position is None else [self.mask_position] * m
        )
        labels = [IGNORE] * n + [*self.blank, eop]
        return Sample(tokens, positions, labels, n, [(n, n + m)])

    def truncated(self, max_length: int) -> Example:
        """Left-truncate the context so the sample fits `max_length` tokens (as the evaluator truncates);
        a ValueError naming the line when the blank or the mask itself would be cut."""
        excess = len(self.context) + len(self.blank) + 1 - max_length
        if excess <= 0:
            return self
        cuts_mask = self.mask_position is not None and self.mask_position < excess
        if cuts_mask or excess >= len(self.context):
            length = len(self.context) + len(self.blank) + 1
            raise ValueError(
                f"{self.where}: the example is {length} tokens; cutting it to --max-length {max_length} "
                "would cut its mask or blank: shorten it or raise --max-length"
            )
        position = None if self.mask_position is None else self.mask_position - excess
        return Example(self.context[excess:], position, self.blank, self.where)


def read_prompts(path: str | Path) -> list[Prompt]:
    """The lines of a JSON-lines file of prompts and completions; a bad line is a ValueError naming the file
    and line and what it needs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a JSON-lines file of prompts, or a task YAML)")
    prompts = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: malformed JSON ({error.msg}); each line is one JSON object") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f'{where}: each line needs {{"prompt": str, "completion": str}}')
        if not isinstance(item.get("completion"), str) or not item["completion"].strip():
            raise ValueError(f"{where}: 'completion' must be a non-empty string (the blank's text)")
        prompts.append(Prompt(item["prompt"], item["completion"], where))
    if not prompts:
        raise ValueError(f"{path}: holds no examples")
    return prompts


def prompt_example(prompt: Prompt, tokenizer: GLMTokenizer) -> Example:
    """A prompt laid out as generation lays it out (glm.decoding.infill.prepare_query)."""
    query = prepare_query(prompt.prompt, tokenizer)
    blank = tokenizer.tokenize_segment(prompt.completion, after_mask=True, before_mask=False)
    position = None if query.use_gmask else query.ids.index(query.mask_id)
    return Example(query.ids, position, blank, prompt.where)


def task_examples(
    yaml_path: str | Path, data_file: str | Path, model: GLM, tokenizer: GLMTokenizer, data_root: str | Path
) -> list[Example]:
    """The examples of one data file of a task config (the evaluator's item format)."""
    config = load_task_config(yaml_path)
    if config.type not in (TaskType.MULTICHOICE, TaskType.GENERATION):
        raise ValueError(f"{yaml_path}: a '{config.type.value}' task has no labelled blanks to train on")
    task = task_class(config)(model, tokenizer, config, data_root)
    task.check_file(config, Path(data_file))
    dataset = task.build_dataset(Path(data_file))
    examples = []
    for number, sample in enumerate(dataset.samples, start=1):
        where = f"{data_file}: item {number}"
        if isinstance(sample, MultiChoiceSample):
            if not isinstance(sample.label, int) or not 0 <= sample.label < len(sample.choices):
                raise ValueError(f"{where}: label {sample.label!r} is not the index of a choice")
            examples.append(
                Example(sample.context, sample.mask_position, sample.choices[sample.label], where)
            )
        elif isinstance(sample, GenerationSample):
            if not sample.targets or not sample.targets[0]:
                raise ValueError(f"{where}: a generation item needs a target to train on")
            examples.append(Example(sample.tokens[:-1], sample.mask_position, sample.targets[0], where))
    if not examples:
        raise ValueError(f"{data_file}: holds no examples")
    return examples


def task_files(yaml_path: str | Path, group: str, data_root: str | Path) -> list[Path]:
    """The files of one group of a task config's file_pattern (e.g. `train`)."""
    config = load_task_config(yaml_path)
    groups = resolve_file_groups(config, Path(data_root))
    if group not in groups:
        raise ValueError(
            f"{yaml_path}: no file group '{group}' (it has {', '.join(groups)}); name one with "
            "--train-split, or give the file with --train-file"
        )
    return groups[group]
