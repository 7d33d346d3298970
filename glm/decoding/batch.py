"""Batched decoding with a static KV cache: the contexts prefilled together, then one token per step
(glm.engine).

The inputs follow GLM-130B's blank infilling: the context (ending in `sop`) is bidirectional except for
`sop`, which with everything generated after it is causal; positions are linear for `[gMASK]` and all equal
to the mask's position from `sop` on for `[MASK]`/`[sMASK]`. Batches are right-padded as in the original
(`evaluation/model.py::batch_filling_sequence`), and every sample gets its own positions and mask, so a batch
gives each sample the logits it would get alone; the strategy is told each sample's own context length, so
its choices (beam search's length penalty and n-gram bans) do not depend on the padding either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glm.distributed import synchronized
from glm.engine import MAX_PREFILL_TOKENS, Prompt, Rows, context_inputs, generated_position
from glm.model import GLM
from glm.strategies import BaseStrategy, BeamSearchStrategy

PAD_TOKEN = 0  # the original pads batches with token 0


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
    """Tokens, positions and masks for contexts that each end in `sop`.

    mask_positions[i] is the index of the `[MASK]`/`[sMASK]` being filled, or None for `[gMASK]`.
    `unidirectional` makes the context causal too (the evaluator's `[gMASK] sop text` layout).
    """
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least the sop token")
    batch = len(contexts)
    lengths = torch.tensor([len(c) for c in contexts])
    padded = int(lengths.max())
    total = padded + max_gen_length
    tokens = torch.full((batch, padded), PAD_TOKEN, dtype=torch.long)
    position_ids = torch.zeros(batch, total, dtype=torch.long)
    visible = torch.zeros(batch, total, total, dtype=torch.bool)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    generated = torch.arange(max_gen_length)
    for i, (context, mask_position) in enumerate(zip(contexts, mask_positions, strict=True)):
        n = len(context)
        tokens[i, :n] = torch.tensor(context)
        position_ids[i, :n] = torch.arange(n)
        if mask_position is None:  # [gMASK]: positions continue after sop
            position_ids[i, padded:] = n + generated
        else:  # [MASK]/[sMASK]: sop and the whole span take the mask's position
            position_ids[i, n - 1] = mask_position
            position_ids[i, padded:] = mask_position
        if unidirectional:
            visible[i, :, :n] = causal[:, :n]
        else:
            visible[i, :, : n - 1] = True  # the context before sop, seen by every row
            visible[i, n - 1 :, n - 1] = True  # sop, seen causally
        visible[i, padded:, padded:] = causal[padded:, padded:]  # generated tokens, causal
    return GenerationInputs(
        tokens.to(device),
        position_ids.to(device),
        (~visible)[:, None].to(device),
        lengths.to(device),
    )


@torch.no_grad()
def generate(
    model: GLM,
    contexts: Sequence[Sequence[int]],
    strategy: BaseStrategy | BeamSearchStrategy,
    max_gen_length: int,
    mask_positions: Sequence[int | None] | None = None,
    on_step: Callable[[Tensor], None] | None = None,
    unidirectional: bool = False,
    max_prefill_tokens: int = MAX_PREFILL_TOKENS,
) -> list[list[list[int]]]:
    """Generate up to max_gen_length tokens after each context (each ending in `sop`).

    `strategy` is a BaseStrategy or BeamSearchStrategy (glm.strategies) over the whole batch. `on_step`
    receives the generated tokens so far, [B, beams, g], after every step (for streaming). Returns, per
    context, its output beams best first: the context followed by the generated tokens (an end token, if
    produced, included). Runs on the engine's rows (glm.engine): context i in group i, its beams in the
    group's rows, the contexts prefilled together (right-padded forwards of at most `max_prefill_tokens`
    padded tokens, each context seeing only itself), beams reordered through the mask.
    """
    if max_gen_length < 1:
        raise ValueError(f"max_gen_length must be at least 1, got {max_gen_length}")
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least the sop token")
    if mask_positions is None:
        mask_positions = [None] * len(contexts)
    strategy = synchronized(strategy)  # tensor parallel: rank 0 decides each step for every rank
    device = model.device
    batch, beams = len(contexts), strategy.num_beams
    lengths = [len(c) for c in contexts]
    padded = max(lengths)
    rows = Rows(model, batch, beams, padded + max_gen_length)
    prompts = [
        Prompt(i, 0, context, *context_inputs(n, mask_position, unidirectional))
        for i, (context, n, mask_position) in enumerate(zip(contexts, lengths, mask_positions, strict=True))
    ]
    # [B, 1, V]: each context's next-token logits at its own sop
    logits = torch.stack(rows.prefill_many(prompts, max_tokens=max_prefill_tokens))[:, None]
    # The strategy sees each context left-aligned to the generated tokens (padding first) and its length,
    # so it can tell a sample's own tokens from the padding.
    tokens = torch.full((batch, 1, padded), PAD_TOKEN, dtype=torch.long, device=device)  # [B, 1, P]
    for i, (context, n) in enumerate(zip(contexts, lengths, strict=True)):
        tokens[i, 0, padded - n :] = torch.tensor(context, device=device)
    # [B, G] position of generated token j; [B, 1] its cache column is the sample's own length + j
    positions = torch.tensor(
        [
            [generated_position(n, m, j) for j in range(max_gen_length)]
            for n, m in zip(lengths, mask_positions, strict=True)
        ],
        device=device,
    )
    columns = torch.tensor(lengths, device=device)[:, None]
    for j in range(max_gen_length):
        if j > 0:
            last = tokens[:, :, -1].clamp(min=0)  # [B, beams]; finished rows hold -1: feed anything
            step = (positions[:, j - 1 : j].expand(-1, beams), (columns + j - 1).expand(-1, beams))
            logits = rows.decode_one_token(last, *step)  # [B, beams, V]
        beams_before = tokens.shape[1]
        tokens, source = strategy.forward(logits.view(batch, beams_before, -1), tokens, lengths)
        if source is not None:  # each new beam continues its source beam's rows: a mask copy
            rows.reorder(source)
        if on_step is not None:
            on_step(tokens[:, :, padded:])
        if strategy.is_done:
            break

    outputs = strategy.finalize(tokens)
    return [[beam[padded - n :] for beam in beams] for beams, n in zip(outputs, lengths, strict=True)]
