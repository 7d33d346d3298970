"""Train the bundled model's sentencepiece BPE tokenizer on the corpus' training split.

    python tools/train_tokenizer.py --corpus data/corpus --output models/tokenizer.model

Byte fallback (any text encodes), identity normalisation (exact round trip), newline as one piece. The GLM
special tokens are added after the vocabulary by glm.tokenizer.GLMTokenizer. Prints chars per token on the
held-out splits.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

from glm.tokenizer import GLMTokenizer

LANGUAGES = ("en", "zh")


def paragraphs(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(corpus: Path, output: Path, vocab_size: int) -> Path:
    lines = [p for lang in LANGUAGES for p in paragraphs(corpus / lang / "train.txt")]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(Path(tmp) / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=16384,
            user_defined_symbols=["\n"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=2,
            minloglevel=2,
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "tokenizer.model", output)
    return output


def chars_per_token(tokenizer: GLMTokenizer, corpus: Path, split: str) -> dict[str, float]:
    result = {}
    for lang in LANGUAGES:
        texts = paragraphs(corpus / lang / f"{split}.txt")
        tokens = sum(len(ids) for ids in tokenizer.sp.encode(texts))
        result[lang] = sum(len(t) for t in texts) / tokens
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--output", type=Path, default=Path("models/tokenizer.model"))
    parser.add_argument("--vocab-size", type=int, default=16000)
    args = parser.parse_args()
    tokenizer = GLMTokenizer.sentencepiece(train(args.corpus, args.output, args.vocab_size))
    for lang, value in chars_per_token(tokenizer, args.corpus, "test").items():
        print(f"{lang}: {value:.2f} chars/token on the test split")
    sample = "Tsinghua University is in Beijing.\n清华大学位于北京。"
    assert tokenizer.detokenize(tokenizer.tokenize(sample)) == sample, "round trip failed"
    print(f"wrote {args.output} ({tokenizer.sp.vocab_size()} pieces + 8 GLM special tokens)")
