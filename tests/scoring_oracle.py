"""The per-choice layout, kept only as a test oracle for glm.scoring's packed rows.

Each choice gets its own row: the context (bidirectional), then `sop + choice[:-1]` (causal, seeing the
context). Built here from plain tensors, one forward per choice, full logits: no code shared with
glm.scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from glm.model import GLM

Positions = Callable[[int], list[int]]  # block length -> the block's position ids


@torch.no_grad()
def block_distributions(
    model: GLM, context: Sequence[int], choice: Sequence[int], sop: int, positions: Sequence[int]
) -> torch.Tensor:
    """Log-softmax [len(choice), V] at each block position: row j is the distribution of choice[j] given
    the context, sop and choice[:j], the choice alone in its row, the block at `positions`."""
    n, k = len(context), len(choice)
    tokens = torch.tensor([[*context, sop, *choice[:-1]]])
    position_ids = torch.tensor([[*range(n), *positions]])
    visible = torch.zeros(n + k, n + k, dtype=torch.bool)
    visible[:, :n] = True
    visible[n:, n:] = torch.ones(k, k, dtype=torch.bool).tril()
    logits = model(tokens, position_ids, ~visible[None, None])[0].float()  # [n + k, V]
    return logits[n:].log_softmax(-1)


def per_choice_logprobs(
    model: GLM, context: Sequence[int], choice: Sequence[int], sop: int, positions: Sequence[int]
) -> list[float]:
    """log p(choice[j] | context, sop, choice[:j]) with the block at `positions`, the choice alone."""
    logprobs = block_distributions(model, context, choice, sop, positions)
    return [float(logprobs[j, t]) for j, t in enumerate(choice)]


def choice_positions(context_length: int, mask_position: int | None, multitask: bool = False) -> Positions:
    """The original's block positions: [gMASK] counts on after the context; [MASK] repeats the mask's
    position, or counts up from it with use_multitask_encoding."""
    if mask_position is None:
        return lambda k: list(range(context_length, context_length + k))
    if multitask:
        return lambda k: list(range(mask_position, mask_position + k))
    return lambda k: [mask_position] * k


def per_choice_scores(
    model: GLM, context: Sequence[int], choices: Sequence[Sequence[int]], sop: int, positions: Positions
) -> list[float]:
    return [sum(per_choice_logprobs(model, context, c, sop, positions(len(c)))) for c in choices]


@torch.no_grad()
def window_nll_by_hand(model: GLM, prompt: Sequence[int], text: Sequence[int], mask: int, sop: int) -> float:
    """The original's LM item, literally: tokens = prompt + [mask, sop] + text[:-1], targets = prompt +
    [mask] + text, linear positions, causal with a bidirectional block over prompt + mask, and the summed
    cross entropy under a loss mask that covers the text only."""
    import torch.nn.functional as F

    tokens = [*prompt, mask, sop, *text[:-1]]
    targets = [*prompt, mask, *text]
    n, division = len(tokens), len(prompt) + 1
    loss_mask = torch.tensor([0.0] * division + [1.0] * len(text))
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    visible[:division, :division] = True
    logits = model(torch.tensor([tokens]), torch.arange(n)[None], ~visible[None, None])[0].float()
    return float((F.cross_entropy(logits, torch.tensor(targets), reduction="none") * loss_mask).sum())
