"""An optional adapter for EleutherAI's lm-evaluation-harness (`pip install lm_eval`, not a dependency).

`GLMAdapter` holds the logic and needs only this project: requests are `(context, continuation)` tuples (or
lm-eval `Instance`s, whose `.args` are read). `make_lm_class()` imports lm_eval and returns `GLMLM`, an
`lm_eval.api.model.LM` delegating to it, so this module imports fine without lm_eval.

Texts are tokenized as the project's evaluator tokenizes a multiple-choice item: the continuation as a choice
(`glm.evaluation.dataset.encode_choice`). The context is a query: a `[MASK]` written in it is the blank
that the continuations fill (the adapter's convention, as blank filling reads queries); otherwise `[gMASK]`
is appended (unless written in it, as a task for glm-serve's `local-completions` writes it: see
glm/serve/echo.py) and the continuations follow the bidirectional context. A context's continuations are
scored as one packed row (`glm.scoring`), as the evaluator scores a multiple-choice item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from glm.decoding.batch import generate
from glm.decoding.factory import make_strategy
from glm.decoding.options import GenerationOptions
from glm.evaluation.dataset import encode_choice, language_model_windows
from glm.model import GLM
from glm.scoring import choice_row, score_rows, window_losses, window_row
from glm.tokenizer import GLMTokenizer


def _args(request: Any) -> tuple[Any, ...]:
    """An lm-eval `Instance`'s arguments, or the request itself when it is already a tuple."""
    return tuple(getattr(request, "args", request))


class GLMAdapter:
    """lm-eval's three request types computed with our model, tokenizer and scoring layout."""

    def __init__(
        self, model: GLM, tokenizer: GLMTokenizer, rolling_stride: int | None = None, max_gen_toks: int = 64
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = model.config.max_sequence_length
        self.rolling_stride = rolling_stride or self.max_length // 2
        self.max_gen_toks = max_gen_toks
        self.mask_id, self.gmask_id = tokenizer.get_command("[MASK]"), tokenizer.get_command("[gMASK]")

    def encode_context(self, context: str) -> tuple[list[int], int | None]:
        """Context ids holding the mask token, and the `[MASK]` position (None: `[gMASK]` appended)."""
        ids = self.tokenizer.tokenize_with_masks(context)
        if self.mask_id in ids:
            return ids, ids.index(self.mask_id)
        if self.gmask_id in ids:  # written in it (as glm-serve's echo reads a prompt): not appended again
            return ids, None
        return [*ids, self.gmask_id], None

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(summed log-prob, every token the argmax) of each continuation; one packed row per context."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(_args(request)[0], []).append(index)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, indices in groups.items():
            ids, position = self.encode_context(context)
            blocks = [encode_choice(self.tokenizer, _args(requests[i])[1]) for i in indices]
            if any(not b for b in blocks):
                raise ValueError("an empty continuation cannot be scored")
            row = choice_row(ids, blocks, position, sop_id=self.tokenizer.sop_id)
            (scores,) = score_rows(self.model, [row])
            for index, score in zip(indices, scores, strict=True):
                results[index] = (score.total, score.greedy)
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Summed log-prob of each whole text: the evaluator's LM windows (`max_length - 1` tokens advancing
        by `rolling_stride`, the part already scored being context), each token scored once."""
        mask, sop = self.gmask_id, self.tokenizer.sop_id
        results = []
        for request in requests:
            ids = self.tokenizer.tokenize(_args(request)[0])
            windows = language_model_windows(ids, self.max_length, self.rolling_stride, unidirectional=False)
            rows = [window_row(w.prompt, w.text, mask_id=mask, sop_id=sop) for w in windows]
            results.append(-sum(window_losses(self.model, rows)) if rows else 0.0)
        return results

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuation of each context, cut before the first of its `until` strings."""
        results = []
        for request in requests:
            context, kwargs = _args(request)[:2]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids, position = self.encode_context(context)
            ids = [*ids, self.tokenizer.sop_id]
            max_new = min(max_new, self.max_length - len(ids))
            if max_new < 1:
                raise ValueError(f"a context of {len(ids)} tokens leaves no room to generate")
            end_ids = self.tokenizer.end_ids
            strategy = make_strategy(GenerationOptions(temperature=1.0, top_k=1, top_p=0.0), 1, end_ids)
            beam = generate(self.model, [ids], strategy, max_new, [position])[0][0][len(ids) :]
            beam = [t for t in beam if t >= 0]
            if beam and beam[-1] in end_ids:
                beam = beam[:-1]
            text = self.tokenizer.detokenize(beam)
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            results.append(text[: min(cuts)] if cuts else text)
        return results


def make_lm_class() -> type:
    """`GLMLM(model, tokenizer, **adapter_options)`: an `lm_eval.api.model.LM` (imports lm_eval now)."""
    from lm_eval.api.model import LM

    class GLMLM(LM):
        def __init__(self, model: GLM, tokenizer: GLMTokenizer, **options: Any) -> None:
            super().__init__()
            self.adapter = GLMAdapter(model, tokenizer, **options)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return self.adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return self.adapter.generate_until(requests)

    return GLMLM
