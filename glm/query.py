"""The layout of a query: its ids, position ids and attention mask, GLM-130B's blank infilling.

A row is a bidirectional context `tokens[:division]` followed by causal blocks, each seeing the context and
itself but no other block (`visible`). A query to generate from is a context ending in `sop`: everything
before `sop` is the bidirectional context, `sop` and the tokens generated after it are one causal block
(`unidirectional` makes the context causal too: a context of one token). Positions are linear for
`[gMASK]`; for `[MASK]`/`[sMASK]`, `sop` and everything generated take the mask's position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_TOKEN = 0  # the original pads batches with token 0


def visible(length: int, division: int, blocks: Sequence[tuple[int, int]]) -> Tensor:
    """[length, length] bool, True = may attend: every row sees `[:division]`, a block's row sees its own
    block [start, end) causally."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:, :division] = True
    for start, end in blocks:
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    return mask


def context_inputs(
    length: int, mask_position: int | None, unidirectional: bool = False
) -> tuple[Tensor, Tensor]:
    """Positions [n] and the bool mask [n, n] (True = masked) of a context of `length` tokens ending in
    `sop`."""
    positions = torch.arange(length)
    if mask_position is not None:
        positions[length - 1] = mask_position
    division = 1 if unidirectional else length - 1
    return positions, ~visible(length, division, [(division, length)])


def generated_position(prompt_length: int, mask_position: int | None, j: int) -> int:
    """The position id of the j-th generated token: linear after the prompt for [gMASK], the mask's own
    position for [MASK]/[sMASK]."""
    return prompt_length + j if mask_position is None else mask_position


@dataclass
class GenerationInputs:
    tokens: Tensor  # [B, P] right-padded contexts, P = longest context
    position_ids: Tensor  # [B, T], T = P + max_gen_length
    attention_mask: Tensor  # [B, 1, T, T] bool, True = masked
    context_lengths: Tensor  # [B]


def build_inputs(
    contexts: Sequence[Sequence[int]],
    max_gen_length: int,
    mask_positions: Sequence[int | None],
    device: torch.device | str = "cpu",
    unidirectional: bool = False,
) -> GenerationInputs:
    """Tokens, positions and masks of a whole right-padded batch of contexts that each end in `sop`, and
    `max_gen_length` generated tokens after the padding (the original's `batch_filling_sequence`).

    mask_positions[i] is the index of the `[MASK]`/`[sMASK]` being filled, or None for `[gMASK]`.
    """
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least the sop token")
    batch = len(contexts)
    lengths = torch.tensor([len(c) for c in contexts])
    padded = int(lengths.max())
    total = padded + max_gen_length
    tokens = torch.full((batch, padded), PAD_TOKEN, dtype=torch.long)
    position_ids = torch.zeros(batch, total, dtype=torch.long)
    seen = torch.zeros(batch, total, total, dtype=torch.bool)
    causal = torch.ones(max_gen_length, max_gen_length, dtype=torch.bool).tril()
    for i, (context, mask_position) in enumerate(zip(contexts, mask_positions, strict=True)):
        n = len(context)
        positions, mask = context_inputs(n, mask_position, unidirectional)
        tokens[i, :n] = torch.tensor(context)
        position_ids[i, :n] = positions
        position_ids[i, padded:] = torch.tensor(
            [generated_position(n, mask_position, j) for j in range(max_gen_length)], dtype=torch.long
        )
        seen[i, :n, :n] = ~mask
        seen[i, n:, :n] = True  # padding and generated rows see the whole context
        seen[i, padded:, padded:] = causal  # generated tokens, causal
    return GenerationInputs(
        tokens.to(device),
        position_ids.to(device),
        (~seen)[:, None].to(device),
        lengths.to(device),
    )
