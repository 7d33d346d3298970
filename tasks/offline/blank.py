"""Multiple choice whose `inputs_pretokenized` marks the blank with a written `[MASK]` (the offline idiom
cloze, built by tools/build_eval_sets.py).

    module: tasks.offline.blank.WrittenMaskMultiChoice

The default task reads `*_pretokenized` as plain text, as the original (whose ChID data ship token ids with
the mask id in place). Here the written `[MASK]` becomes the mask token, so each choice fills the blank in
the middle of the sentence; the text around it is tokenized as the project's tokenizer does for a query.
"""

from __future__ import annotations

from glm.evaluation.tasks import MultiChoiceTask


class WrittenMaskMultiChoice(MultiChoiceTask):
    def encode_inputs(self, text: str) -> list[int]:
        return self.tokenizer.tokenize_with_masks(text)
