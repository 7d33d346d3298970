"""The bundled model's model-card numbers on the offline sets of tasks/offline/ (tools/build_eval_sets.py).

    python tools/evaluate_bundled.py --checkpoint runs/export [--limit N] [--json OUT]

* Held-out perplexity (en_lm, zh_lm) under the `[gMASK]` layout: the text's documents, tokenized as in
  training and concatenated, are cut into windows of 200 tokens advancing by 160; in each window the first
  40 tokens are a bidirectional prefix and the other 160 are scored (so every token after the first 40 is
  scored once, as the original evaluator's LM windows). Per token, and per character of the scored tokens
  (comparable across tokenizers). Baseline: an add-one unigram model of the TRAIN split's token counts
  under the same tokenizer, on the same tokens.
* English LAMBADA-style cloze: greedy generation after `context + [gMASK] + sop`; the first generated word,
  stripped of trailing punctuation, must equal the target exactly (case-sensitive, as the original's
  exact match after strip()). Baseline: always answering the TRAIN split's most frequent final word of
  paragraphs that qualify as items.
* Chinese idiom cloze (7-way): the argmax of the summed log-prob of each choice filling `[MASK]`
  (glm.scoring.choice_logprobs); chance is 1/7.

`--limit N` evaluates the first N items of each cloze task and the first N windows of each LM text.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from glm.api import load
from glm.decoding import generate
from glm.model import GLM
from glm.scoring import choice_logprobs, lm_logprobs
from glm.strategies import BaseStrategy
from glm.tokenizer import GLMTokenizer
from tools.build_eval_sets import ROOT, final_word_item, read_documents

WINDOW, PREFIX = 200, 40
LAMBADA_MAX_GEN = 10
NUM_CHOICES = 7
_TRAILING = re.compile(r"[\W_]+$")


# ---------------------------------------------------------------------------------------- language modelling


def encode_documents(tokenizer: GLMTokenizer, documents: list[list[str]]) -> list[int]:
    """Documents as training sees them (paragraphs joined by a newline, one encode each), back to back."""
    encoded = tokenizer.sp.encode(["\n".join(d) for d in documents], num_threads=1)
    return [t + tokenizer.text_offset for t in itertools.chain.from_iterable(encoded)]


def token_chars(tokenizer: GLMTokenizer) -> torch.Tensor:
    """Characters each id contributes to decoded text: a piece's length (▁ is a space), 1 for the first
    byte of a byte-fallback character and 0 for its continuation bytes, 0 for control pieces."""
    sp = tokenizer.sp
    chars = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            chars[tokenizer.text_offset + i] = 0 if 0x80 <= int(sp.id_to_piece(i)[3:5], 16) < 0xC0 else 1
        elif not sp.is_control(i):
            chars[tokenizer.text_offset + i] = 1 if sp.is_unknown(i) else len(sp.id_to_piece(i))
    return chars


def unigram_logprobs(tokenizer: GLMTokenizer, train: Path) -> torch.Tensor:
    """log p(id) of an add-one unigram model over the tokenizer's text ids, fitted on a corpus split."""
    ids = encode_documents(tokenizer, read_documents(train))
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    counts += torch.bincount(torch.tensor(ids), minlength=tokenizer.vocab_size)[: tokenizer.vocab_size]
    text = slice(tokenizer.text_offset, tokenizer.text_end)
    counts[text] += 1
    return (counts / counts[text].sum()).log()  # ids outside the text vocabulary get -inf (never scored)


def windows(n: int) -> list[tuple[int, int, int]]:
    """(start, prefix end, end) of each window: every token from PREFIX on is scored exactly once."""
    stride = WINDOW - PREFIX
    return [(s, s + PREFIX, min(s + WINDOW, n)) for s in range(0, max(n - PREFIX, 0), stride)]


def evaluate_lm(
    model: GLM, tokenizer: GLMTokenizer, text_file: Path, unigram: torch.Tensor | None, limit: int | None
) -> dict:
    ids = encode_documents(tokenizer, read_documents(text_file))
    chars = token_chars(tokenizer)
    gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.sop_id
    nll = unigram_nll = 0.0
    tokens = characters = 0
    for start, middle, end in windows(len(ids))[:limit]:
        scored = torch.tensor(ids[middle:end])
        nll -= float(lm_logprobs(model, ids[start:end], middle - start, gmask_id=gmask, sop_id=sop).sum())
        if unigram is not None:
            unigram_nll -= float(unigram[scored].sum())
        tokens += len(scored)
        characters += int(chars[scored].sum())
    result = {
        "tokens": tokens,
        "characters": characters,
        "ppl_token": math.exp(nll / tokens),
        "ppl_char": math.exp(nll / characters),
    }
    if unigram is not None:
        result["unigram_ppl_token"] = math.exp(unigram_nll / tokens)
        result["unigram_ppl_char"] = math.exp(unigram_nll / characters)
    return result


# ------------------------------------------------------------------------------------------------ LAMBADA


def first_word(text: str) -> str:
    words = text.strip().split()
    return _TRAILING.sub("", words[0]) if words else ""


def evaluate_lambada(
    model: GLM, tokenizer: GLMTokenizer, items: list[dict], batch_size: int, baseline_word: str | None
) -> dict:
    gmask, sop = tokenizer.get_command("[gMASK]"), tokenizer.sop_id
    budget = model.config.max_sequence_length - LAMBADA_MAX_GEN - 2  # left truncation, as the original
    # A word is text: every special token but eop (which ends the answer) is invalid, as are padding rows.
    eop = tokenizer.eop_id
    invalid = [slice(tokenizer.special_base, eop), slice(eop + 1, None)]
    correct, examples = 0, []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        contexts = [[*tokenizer.tokenize(it["inputs_pretokenized"])[-budget:], gmask, sop] for it in batch]
        strategy = BaseStrategy(len(batch), invalid, top_k=1, end_tokens=tokenizer.end_ids)  # greedy
        outputs = generate(model, contexts, strategy, LAMBADA_MAX_GEN)
        for item, context, beams in zip(batch, contexts, outputs, strict=True):
            generated = [t for t in beams[0][len(context) :] if t not in tokenizer.end_ids]
            prediction = first_word(tokenizer.detokenize(generated))
            target = item["targets_pretokenized"][0].strip()
            correct += prediction == target
            if len(examples) < 5:
                examples.append({"target": target, "prediction": prediction})
    result = {"items": len(items), "accuracy": correct / len(items), "examples": examples}
    if baseline_word is not None:
        hits = sum(it["targets_pretokenized"][0].strip() == baseline_word for it in items)
        result |= {"baseline_word": baseline_word, "baseline_accuracy": hits / len(items)}
    return result


def most_frequent_final_word(train: Path) -> str:
    words = Counter()
    for paragraph in (p for doc in read_documents(train) for p in doc):
        item = final_word_item(paragraph)
        if item is not None:
            words[item[1]] += 1
    return max(sorted(words), key=words.__getitem__)  # ties: alphabetically first


# ------------------------------------------------------------------------------------------- idiom cloze


def infix_ids(tokenizer: GLMTokenizer, left: str, span: str) -> list[int]:
    """Tokens of `span` as it is tokenized right after `left` in running text (so no word-start ▁ in
    Chinese text), where left + span tokenizes as left's tokens plus more; otherwise span on its own."""
    if left:
        base, full = tokenizer.tokenize(left), tokenizer.tokenize(left + span)
        if len(full) > len(base) and full[: len(base)] == base:
            return full[len(base) :]
    return tokenizer.tokenize(span)


def cloze_context(tokenizer: GLMTokenizer, left: str, right: str) -> list[int]:
    """`left [MASK] right` as training lays out a [MASK] sample: the text's own tokens around the mask (the
    right part tokenized as it continues `left`, so no word-start ▁ in Chinese), then eos unless the text
    ends in the mask (as glm.infill.prepare_query)."""
    mask_id = tokenizer.get_command("[MASK]")
    if not right:
        return [*tokenizer.tokenize(left), mask_id]
    return [*tokenizer.tokenize(left), mask_id, *infix_ids(tokenizer, left, right), tokenizer.eos_id]


def evaluate_idioms(model: GLM, tokenizer: GLMTokenizer, items: list[dict]) -> dict:
    mask_id, sop = tokenizer.get_command("[MASK]"), tokenizer.sop_id
    correct = skipped = 0
    for item in items:
        left, right = item["inputs_pretokenized"].split("[MASK]")
        choices = [infix_ids(tokenizer, left, c) for c in item["choices_pretokenized"]]
        ids = cloze_context(tokenizer, left, right)
        budget = model.config.max_sequence_length - max(map(len, choices)) - 1  # sop included
        ids = ids[max(0, len(ids) - budget) :]  # left truncation, as the original
        if mask_id not in ids:
            skipped += 1
            continue
        scores = choice_logprobs(model, ids, choices, ids.index(mask_id), sop_id=sop)
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    return {
        "items": len(items),
        "skipped": skipped,
        "accuracy": correct / len(items),
        "chance": 1 / NUM_CHOICES,
    }


# ------------------------------------------------------------------------------------------------ report


def read_jsonl(path: Path, limit: int | None) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, limit)]


def table(results: dict) -> str:
    rows = [("metric", "model", "baseline", "baseline is")]
    for lang in ("en", "zh"):
        lm = results["lm"][lang]
        for unit in ("token", "char"):
            base = lm.get(f"unigram_ppl_{unit}")
            rows.append(
                (
                    f"{lang} ppl / {unit}",
                    f"{lm[f'ppl_{unit}']:.2f}",
                    "-" if base is None else f"{base:.2f}",
                    "unigram",
                )
            )
    lam = results["lambada"]
    base = lam.get("baseline_accuracy")
    rows.append(
        (
            "en LAMBADA-style acc %",
            f"{100 * lam['accuracy']:.1f}",
            "-" if base is None else f"{100 * base:.1f}",
            f"always {lam.get('baseline_word', '?')!r}",
        )
    )
    idioms = results["idioms"]
    rows.append(
        ("zh idiom cloze acc %", f"{100 * idioms['accuracy']:.1f}", f"{100 / NUM_CHOICES:.1f}", "chance")
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="first N items / LM windows of each task")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--tasks", type=Path, default=ROOT / "tasks" / "offline")
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus", help="TRAIN split, for baselines")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16, help="LAMBADA generation batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.time()
    model, tokenizer = load(args.checkpoint, dtype=args.dtype, device=args.device)
    model.eval()
    train = {lang: args.corpus / lang / "train.txt" for lang in ("en", "zh")}
    missing = [str(f) for f in train.values() if not f.is_file()]
    if missing:
        print(
            f"warning: {', '.join(missing)} missing: baselines are skipped (see data/README.md)",
            file=sys.stderr,
        )
    results: dict = {"checkpoint": str(args.checkpoint), "limit": args.limit, "lm": {}}
    for lang in ("en", "zh"):
        unigram = unigram_logprobs(tokenizer, train[lang]) if train[lang].is_file() else None
        results["lm"][lang] = evaluate_lm(
            model, tokenizer, args.tasks / f"{lang}_lm" / "test.txt", unigram, args.limit
        )
    baseline_word = most_frequent_final_word(train["en"]) if train["en"].is_file() else None
    lambada = read_jsonl(args.tasks / "en_lambada_cloze" / "test.jsonl", args.limit)
    results["lambada"] = evaluate_lambada(model, tokenizer, lambada, args.batch_size, baseline_word)
    idioms = read_jsonl(args.tasks / "zh_idiom_cloze" / "test.jsonl", args.limit)
    results["idioms"] = evaluate_idioms(model, tokenizer, idioms)
    results["seconds"] = round(time.time() - started, 1)

    print(table(results))
    print(f"({results['seconds']} s; {len(lambada)} LAMBADA items, {len(idioms)} idiom items)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
