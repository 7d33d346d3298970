"""Tests for glm.tokenizer against a tiny sentencepiece model trained on the fly."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import sentencepiece as spm

import glm.tokenizer
from glm.tokenizer import SPECIAL_TOKENS, GLMTokenizer

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the previous ones.",
    "Blank infilling replaces a span of text with a mask token.",
    "The weather today is sunny with a light breeze.",
    "She reads a book every evening before going to sleep.",
    "Numbers like 42 and 3.14 appear in many texts.",
    "Large models need a lot of memory to run inference.",
    "The cat sat on the mat and looked out of the window.",
]
CHINESE = [
    "今天天气很好，我们去公园散步。",
    "语言模型可以根据上文预测下一个词。",
    "清华大学位于北京市海淀区。",
    "他每天早上喝一杯咖啡。",
    "这本书讲述了一个有趣的故事。",
    "我们正在测试中文分词器。",
]
SP_VOCAB = 400


def _sentences():
    # A few hundred lines: recombine the base sentences so BPE sees repeated patterns.
    for a, b in itertools.product(ENGLISH + CHINESE, repeat=2):
        yield f"{a} {b}"
    for _ in range(3):
        yield "line one<n>line two"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(),
        model_prefix=str(folder / "ice_text"),
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<n>"],  # like ice_text.model, "<n>" is a single piece
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return folder / "ice_text.model"


@pytest.fixture(scope="module")
def raw_sp(sp_model: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def ice(sp_model: Path) -> GLMTokenizer:
    return GLMTokenizer.icetk(sp_model)


@pytest.fixture(scope="module")
def generic(sp_model: Path) -> GLMTokenizer:
    return GLMTokenizer.sentencepiece(sp_model)


TEXTS = ["The quick brown fox.", "今天天气很好，我们去公园散步。", "Mixed 中文 and English 123!"]


@pytest.mark.parametrize("text", TEXTS)
def test_icetk_ids_are_sp_ids_plus_20000(ice, raw_sp, text):
    assert ice.tokenize(text) == [i + 20000 for i in raw_sp.encode(text)]


def test_icetk_commands(ice, raw_sp):
    assert raw_sp.id_to_piece(2) == "</s>"
    assert [ice.get_command(name) for name in SPECIAL_TOKENS] == list(range(150000, 150008))
    assert ice.get_command("eos") == ice.eos_id == 20002
    assert ice.get_command("pad") == 0
    assert (ice.sop_id, ice.eop_id) == (150004, 150005)
    assert ice.mask_ids == {"[MASK]": 150000, "[gMASK]": 150001, "[sMASK]": 150002}
    assert ice.end_ids == [150005, 20002]
    assert ice.vocab_size == 150008
    assert ice.is_special(150000) and ice.is_special(150007)
    assert not ice.is_special(150008) and not ice.is_special(20002)


def test_icetk_id_token_helpers(ice):
    assert ice.id_to_token(0) == "[pad]"
    assert ice.token_to_id("[pad]") == 0
    assert ice.id_to_token(150001) == "[[gMASK]]"
    assert ice.token_to_id("sop") == 150004


def test_unknown_command_raises(ice):
    with pytest.raises(KeyError, match="unknown command"):
        ice.get_command("[BOGUS]")


@pytest.mark.parametrize("text", TEXTS)
def test_icetk_round_trip(ice, text):
    assert ice.detokenize(ice.tokenize(text)) == text


def test_icetk_detokenize_specials(ice):
    a, b = ice.tokenize("Hello"), ice.tokenize("world")
    assert ice.detokenize([*a, 150000, *b]) == "Hello[[MASK]]world"
    assert ice.detokenize([150001, 150004, *a, 150005]) == "[[gMASK]][sop]Hello[eop]"
    # Like SAT, eos splits the text and is written as "[</s>]".
    assert ice.detokenize([*a, 20002]) == "Hello[</s>]"


def test_icetk_detokenize_skips_out_of_range(ice):
    a = ice.tokenize("Hello")
    assert ice.detokenize([5, *a, 150008, 150527]) == "Hello"


def test_icetk_newlines(ice, raw_sp):
    newline_piece = raw_sp.piece_to_id("<n>") + 20000
    # encode: "\n" goes to sentencepiece as-is (icetk's default ignore_linebreak=True) ...
    text = "line one\nline two"
    ids = ice.tokenize(text)
    assert ids == [i + 20000 for i in raw_sp.encode(text)]
    assert newline_piece not in ids
    # ... decode: "<n>" in the decoded text becomes "\n".
    ids = ice.tokenize("line one<n>line two")
    assert newline_piece in ids
    assert ice.detokenize(ids) == "line one\nline two"


def test_icetk_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "ice_text.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        GLMTokenizer.icetk(missing)


def test_sentencepiece_flavour(generic, raw_sp):
    assert generic.special_base == raw_sp.vocab_size() == SP_VOCAB
    assert [generic.get_command(n) for n in SPECIAL_TOKENS] == list(range(SP_VOCAB, SP_VOCAB + 8))
    assert generic.eos_id == raw_sp.eos_id()
    assert generic.vocab_size == SP_VOCAB + 8
    for text in [*TEXTS, "tabs\tand\nnewlines  and <n> stay"]:
        assert generic.tokenize(text) == raw_sp.encode(text)
        assert generic.detokenize(generic.tokenize(text)) == text
    a = generic.tokenize("Hi")
    assert generic.detokenize([*a, SP_VOCAB + 2, *a]) == "Hi[[sMASK]]Hi"


def test_config_round_trip(ice, generic, sp_model):
    for tok in (ice, generic):
        config = tok.to_config()
        assert config["file"] == "ice_text.model"
        rebuilt = GLMTokenizer.from_config(config, sp_model.parent)
        assert rebuilt.kind == tok.kind
        assert (rebuilt.text_offset, rebuilt.special_base, rebuilt.eos_id) == (
            tok.text_offset,
            tok.special_base,
            tok.eos_id,
        )
        assert rebuilt.tokenize("Hello 世界") == tok.tokenize("Hello 世界")
    assert ice.to_config()["type"] == "icetk"
    assert generic.to_config()["type"] == "sentencepiece"


def test_icetk_config_falls_back_to_default_file(sp_model, tmp_path, monkeypatch):
    config = {"type": "icetk", "file": "ice_text.model"}
    monkeypatch.setattr(glm.tokenizer, "ICETK_DEFAULT_FILE", sp_model)
    assert GLMTokenizer.from_config(config, tmp_path).model_file == sp_model
    monkeypatch.setattr(glm.tokenizer, "ICETK_DEFAULT_FILE", tmp_path / "absent.model")
    with pytest.raises(FileNotFoundError, match=r"absent\.model"):
        GLMTokenizer.from_config(config, tmp_path)
