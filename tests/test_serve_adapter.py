"""`glm-serve --adapter PATH` answers with the adapted model: its greedy completion is the one in-process
greedy decoding gives with the adapter attached, which differs from the base model's."""

from __future__ import annotations

import torch
from test_serve import MODEL, post, start_server, stop_server

from glm.adapters.files import attach_adapter, base_identity, save_adapter
from glm.adapters.lora import LoRAOptions, apply_lora, lora_layers
from glm.api import load
from glm.decoding import generate
from glm.decoding.factory import banned_tokens
from glm.decoding.infill import prepare_query
from glm.decoding.strategies import BaseStrategy
from glm.run_config import DEFAULT_MODEL

PROMPT = "Tsinghua University is located in [MASK]."
MAX_TOKENS = 8


def greedy_blank(model, tok) -> str:
    """The blank greedy decoding fills in PROMPT, as glm-serve decodes it (its banned tokens, its ends)."""
    query = prepare_query(PROMPT, tok)
    context = [*query.ids, tok.sop_id]
    strategy = BaseStrategy(1, banned_tokens(tok), top_k=1, end_tokens=[tok.eop_id, tok.eos_id])
    ((out,),) = generate(model, [context], strategy, MAX_TOKENS, [query.ids.index(query.mask_id)])
    blank = [t for t in out[len(context) :] if t not in (tok.eop_id, tok.eos_id)]
    return tok.detokenize(blank)


def test_serve_with_adapter_answers_with_the_adapted_model(tmp_path):
    model, tok = load()
    base_text = greedy_blank(model, tok)
    apply_lora(model, LoRAOptions(rank=4, targets=("attention.query_key_value", "attention.dense")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero B: the adapter changes the model (a fresh one is the base exactly)
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=generator))
    folder = save_adapter(tmp_path / "adapter", model, base_identity(DEFAULT_MODEL, model.config))
    adapted = attach_adapter(load()[0], folder, DEFAULT_MODEL)
    expected = greedy_blank(adapted, tok)
    assert expected != base_text  # the adapter is not trivial, so the served answer tells them apart

    process, url = start_server("--adapter", str(folder), "--device", "cpu")
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        reply = post(f"{url}/v1/completions", body)
    finally:
        stop_server(process)
    assert reply.status_code == 200, reply.json()
    assert reply.json()["choices"][0]["text"] == expected
