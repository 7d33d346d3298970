"""An optional adapter for EleutherAI's lm-evaluation-harness (`pip install lm_eval`, not a dependency).

`GLMAdapter` holds the logic and needs only this project: requests are `(context, continuation)` tuples (or
lm-eval `Instance`s, whose `.args` are read). `make_lm_class()` imports lm_eval and returns `GLMLM`, an
`lm_eval.api.model.LM` delegating to it, so this module imports fine without lm_eval.

Texts are tokenized as the project's evaluator tokenizes a multiple-choice item (`glm.evaluation.dataset`):
the context with `encode_text` (a `[MASK]` written in it becomes the mask token), the continuation with
`encode_choice`. A context holding `[MASK]` is scored as the filling of that blank (the evaluator's layout
for such items, so lm-eval's `acc` equals our Accuracy); otherwise `[gMASK]` is appended and the
continuation follows the bidirectional context as a causal block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from glm.decoding import generate
from glm.evaluation.dataset import _block_logits, encode_choice, encode_text
from glm.model import GLM
from glm.scoring import lm_logprobs
from glm.strategies import BaseStrategy
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
        ids = encode_text(self.tokenizer, context)
        if self.mask_id in ids:
            return ids, ids.index(self.mask_id)
        return [*ids, self.gmask_id], None

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(summed log-prob, every token the argmax) of each continuation; one forward pass per context."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(_args(request)[0], []).append(index)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, indices in groups.items():
            ids, position = self.encode_context(context)
            blocks = [encode_choice(self.tokenizer, _args(requests[i])[1]) for i in indices]
            if any(not b for b in blocks):
                raise ValueError("an empty continuation cannot be scored")
            rows = len(blocks)
            logits = _block_logits(self.model, [ids] * rows, blocks, [position] * rows, self.tokenizer.sop_id)
            logprobs = logits.float().log_softmax(-1).cpu()
            for row, (index, block) in enumerate(zip(indices, blocks, strict=True)):
                steps, target = torch.arange(len(block)), torch.tensor(block)
                scores = logprobs[row, steps]
                greedy = bool((scores.argmax(-1) == target).all())
                results[index] = (float(scores[steps, target].sum()), greedy)
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Summed log-prob of each whole text: windows of `max_length - 1` tokens advancing by
        `rolling_stride`, each token scored once given up to `max_length - 1 - stride` earlier ones."""
        results = []
        for request in requests:
            ids = self.tokenizer.tokenize(_args(request)[0])
            total, start, window = 0.0, 0, self.max_length - 1
            while start < len(ids):
                end = min(start + self.rolling_stride, len(ids)) if start else min(window, len(ids))
                prefix = max(0, end - window)
                chunk = ids[prefix:end]
                sop = self.tokenizer.sop_id
                scores = lm_logprobs(self.model, chunk, start - prefix, gmask_id=self.gmask_id, sop_id=sop)
                total += float(scores.sum())
                start = end
            results.append(total)
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
            strategy = BaseStrategy(1, temperature=1.0, top_k=1, end_tokens=end_ids)
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
