"""Build a small UNTRAINED model: a sentencepiece tokenizer and random GLM weights, in seconds.

The tests build one to exercise the loader, generation and the command lines without the bundled model;
its output is random text. Deterministic: the same command writes the same files.

    python tools/build_untrained_model.py --output /tmp/glm-tiny-untrained
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import sentencepiece as spm

from glm.checkpoint import save_checkpoint
from glm.config import GLMConfig
from glm.model import GLM, init_random_weights
from glm.tokenizer import GLMTokenizer

TEXT = Path(__file__).parent / "data" / "placeholder_text.txt"


def train_tokenizer(text: Path, prefix: Path, vocab_size: int) -> Path:
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],  # as the bundled model's tokenizer (tools/train_tokenizer.py)
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def main(output: Path, vocab_size: int, seed: int, overwrite: bool) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = GLMTokenizer.sentencepiece(train_tokenizer(TEXT, Path(tmp) / "tokenizer", vocab_size))
        padded_vocab = -(-tokenizer.vocab_size // 64) * 64
        config = GLMConfig(
            num_layers=2,
            hidden_size=128,
            num_attention_heads=4,
            inner_hidden_size=344,
            vocab_size=padded_vocab,
            max_sequence_length=512,
        )
        model = init_random_weights(GLM(config), seed=seed).half()
        return save_checkpoint(model.state_dict(), output, config, tokenizer, overwrite=overwrite)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=600, help="sentencepiece vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    print(f"wrote {main(args.output, args.vocab_size, args.seed, args.overwrite)}")
