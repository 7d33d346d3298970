"""The original's LAMBADA customisation (`tasks/lambada/task.py`): the answer is the first generated word,
scored by exact match after strip() (case-sensitive, no normalisation).

    module: tasks.lambada.task.LAMBADA

Over the beams (best first), a beam whose second space-separated word is a punctuation mark gives the
answer; otherwise beam 0 does. Unlike the original, trailing punctuation is stripped from the word
(sentencepiece decodes "word." where icetk's text split it off), and beam search is the plain
deterministic one (no banned prefixes).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

from glm.evaluation.dataset import GenerationSample
from glm.evaluation.metrics import Examples, Metric
from glm.evaluation.tasks import GenerationTask

_TRAILING = re.compile(r"[\W_]+$")


def first_word(text: str) -> str:
    """The first space-separated word of `text`, without trailing punctuation."""
    words = text.strip().split()
    return _TRAILING.sub("", words[0]) if words else ""


def first_word_accuracy(predictions: Sequence[Any], examples: Examples) -> float:
    """100 × the fraction of predictions equal to a target after strip()."""
    correct = sum(
        any(str(p).strip() == t.strip() for t in example["targets"])
        for p, example in zip(predictions, examples, strict=True)
    )
    return 100.0 * correct / max(len(predictions), 1)


class LAMBADA(GenerationTask):
    """Generation scored by the first word of the answer."""

    @property
    def metrics(self) -> dict[str, Metric]:
        return {"Accuracy": Metric("Accuracy", first_word_accuracy)}

    def predict_single_batch(self, batch: list[GenerationSample]) -> list[str]:
        predictions = []
        for beams in self.generate(batch):
            texts = [self.tokenizer.detokenize(beam).strip() for beam in beams]
            chosen = next(
                (t for t in texts if len(t.split(" ")) >= 2 and t.split(" ")[1] in string.punctuation),
                texts[0] if texts else "",
            )
            predictions.append(first_word(chosen))
        return predictions
