"""Log-probabilities of given continuations, for evaluation: multiple-choice blanks and language modelling.

Everything is scored under the layout generation uses (`glm.decoding.build_inputs`), as the original
evaluator does (`evaluation/dataset.py`): a bidirectional context holding the mask token, then `sop` and the
continuation as a causal block that sees the whole context. For `[MASK]` the block takes the mask's
position; for `[gMASK]` (the last context token) positions continue after the context. Teacher forcing: the
block's inputs are `sop` + continuation[:-1], its targets the continuation. Sums are not length-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glm.decoding import PAD_TOKEN, build_inputs
from glm.model import GLM


@torch.no_grad()
def block_logprobs(
    model: GLM,
    context_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    mask_id_position: int | None,
    *,
    sop_id: int,
) -> list[Tensor]:
    """Per-token log-probs (fp32, one tensor per continuation) of each continuation filling the blank.

    `context_ids` holds the mask token: `[MASK]`/`[sMASK]` at `mask_id_position`, or `[gMASK]` as its last
    token when `mask_id_position` is None; `sop` is appended here. All continuations are scored in one
    forward pass, one row each (rows are independent: a block sees only the context and itself).
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("need at least one continuation, and none may be empty")
    if mask_id_position is not None and not 0 <= mask_id_position < len(context_ids):
        raise ValueError(f"mask position {mask_id_position} is outside the context of {len(context_ids)}")
    context = [*context_ids, sop_id]
    n, longest, rows = len(context), max(len(c) for c in continuations), len(continuations)
    if n + longest - 1 > model.config.max_sequence_length:
        raise ValueError(
            f"context {n} + continuation {longest} tokens exceed the model's maximum sequence length "
            f"{model.config.max_sequence_length}"
        )
    device = model.device
    inputs = build_inputs([context] * rows, longest - 1, [mask_id_position] * rows, device)
    targets = torch.full((rows, longest), PAD_TOKEN, dtype=torch.long)
    for i, continuation in enumerate(continuations):
        targets[i, : len(continuation)] = torch.tensor(continuation)
    targets = targets.to(device)
    tokens = torch.cat([inputs.tokens, targets[:, :-1]], dim=1)  # [rows, n + longest - 1]
    logits_at = torch.arange(n - 1, n - 1 + longest, device=device).expand(rows, -1)  # sop .. last input
    logits = model(tokens, inputs.position_ids, inputs.attention_mask, logits_at=logits_at)  # [rows, L, V]
    logprobs = logits.float().log_softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # [rows, L]
    return [logprobs[i, : len(c)].cpu() for i, c in enumerate(continuations)]


def choice_logprobs(
    model: GLM,
    context_ids: Sequence[int],
    choices: Sequence[Sequence[int]],
    mask_id_position: int | None,
    *,
    sop_id: int,
) -> list[float]:
    """The summed log-probability of each choice filling the blank (the original's `cond_log_prob`).

    `context_ids` contains `[MASK]` at `mask_id_position`, or ends with `[gMASK]` when it is None. The
    prediction of a multiple-choice task is the argmax of the returned list.
    """
    return [
        float(t.sum()) for t in block_logprobs(model, context_ids, choices, mask_id_position, sop_id=sop_id)
    ]


def lm_logprobs(model: GLM, ids: Sequence[int], prefix: int, *, gmask_id: int, sop_id: int) -> Tensor:
    """Log-probs [len(ids) - prefix] (fp32) of ids[prefix:] given the bidirectional prefix ids[:prefix].

    The `[gMASK]` language-modelling layout of GLM-130B: context = ids[:prefix] + [gMASK] (positions
    0..prefix, all tokens see each other), then `sop` + ids[prefix:-1] as a causal block with positions
    continuing after the context; entry i is log p(ids[prefix + i] | ids[:prefix + i]). `prefix` may be 0
    (only `[gMASK]` as context). The negated sum over windows gives the held-out NLL for perplexity.
    """
    if not 0 <= prefix < len(ids):
        raise ValueError(f"prefix {prefix} leaves nothing to score in {len(ids)} tokens")
    return block_logprobs(model, [*ids[:prefix], gmask_id], [ids[prefix:]], None, sop_id=sop_id)[0]
