"""GLM tokenizers: icetk-compatible (GLM-130B) and plain sentencepiece, with one interface.

The icetk flavour reproduces the id mapping of SwissArmyTransformer's ``_IceTokenizer``
(``SwissArmyTransformer/tokenization/icetk_glm_130B/ice_tokenizer.py``) on top of icetk's
``IceTokenizer`` (``icetk/ice_tokenizer.py``), reading ``ice_text.model`` with sentencepiece directly:
ids below 20000 are image tokens, text ids are sentencepiece ids + 20000 and the special tokens
start at 150000.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")
MASK_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]")
MASK_PATTERN = re.compile(r"(\[[sg]?MASK\])")  # splits text into text, mask, text, ..., text
ICETK_DEFAULT_FILE = Path("~/.icetk_models/ice_text.model")
ICETK_TEXT_OFFSET = 20000  # icetk's num_image_tokens
ICETK_SPECIAL_BASE = 150000  # SAT's _IceTokenizer.num_tokens
ICETK_EOS = 20002  # SAT hardcodes special_tokens["eos"] = 20002 (sentencepiece "</s>" = 2)
KINDS = ("icetk", "sentencepiece")


class GLMTokenizer:
    """Text <-> ids for GLM models; special tokens occupy ``[special_base, special_base + 8)``."""

    def __init__(self, model_file: str | Path, text_offset: int, special_base: int, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_file}")
        self.kind = kind
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.text_offset = text_offset
        self.special_base = special_base
        self.text_end = text_offset + self.sp.vocab_size()
        if self.text_end > special_base:
            raise ValueError(
                f"text ids [{text_offset}, {self.text_end}) overlap special ids starting at {special_base}"
            )

        self._commands = {name: special_base + i for i, name in enumerate(SPECIAL_TOKENS)}
        if kind == "icetk":
            eos, pad = ICETK_EOS, 0
        else:
            eos = self.sp.eos_id()
            if eos < 0:
                raise ValueError(f"sentencepiece model {self.model_file} has no eos token (eos_id=-1)")
            eos += text_offset
            pad = self.sp.pad_id() + text_offset if self.sp.pad_id() >= 0 else eos
        self._commands["eos"] = eos
        self._commands["pad"] = pad
        # Like SAT, eos also splits the text in detokenize and is written as "[</s>]".
        self._decoder = {special_base + i: name for i, name in enumerate(SPECIAL_TOKENS)}
        self._decoder[eos] = "</s>" if kind == "icetk" else self.sp.id_to_piece(eos - text_offset)
        newline = self.sp.piece_to_id("\n")
        self._newline = newline if self.sp.id_to_piece(newline) == "\n" else None  # a piece of its own?

    @classmethod
    def icetk(cls, model_file: str | Path | None = None) -> GLMTokenizer:
        """GLM-130B tokenizer from icetk's ``ice_text.model`` (default ``~/.icetk_models/ice_text.model``)."""
        path = Path(model_file).expanduser() if model_file is not None else ICETK_DEFAULT_FILE.expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"icetk text model not found at {path}: copy icetk's ice_text.model there "
                "or pass its path explicitly"
            )
        return cls(path, ICETK_TEXT_OFFSET, ICETK_SPECIAL_BASE, "icetk")

    @classmethod
    def sentencepiece(cls, model_file: str | Path) -> GLMTokenizer:
        """Generic tokenizer: sentencepiece ids as-is, special tokens right after the sp vocabulary."""
        path = Path(model_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        vocab = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
        return cls(path, 0, vocab, "sentencepiece")

    def tokenize(self, text: str) -> list[int]:
        """Encode plain text (no mask tokens) to ids."""
        # Matches SAT's tokenize -> icetk.encode(text) with the default ignore_linebreak=True,
        # i.e. "\n" is handed to sentencepiece unchanged (no "<n>" substitution).
        return [i + self.text_offset for i in self.sp.encode(text)]

    def tokenize_segment(self, text: str, after_mask: bool, before_mask: bool) -> list[int]:
        """Encode the text between mask tokens of a query.

        icetk (GLM-130B) encodes every segment on its own, as the original generate.py did. The project's
        own models were trained on whole documents with blanks cut out of one tokenization, so for them a
        segment is encoded as it would be inside the whole text: no sentencepiece dummy "▁" after a mask,
        and no lone trailing "▁" before one (the space belongs to the blank's first token).
        """
        if self.kind == "icetk" or self._newline is None:
            return self.tokenize(text)
        if before_mask:
            text = text.rstrip(" ")
        if not after_mask:
            return self.tokenize(text)
        # Text after the user-defined newline piece is encoded without the dummy prefix.
        ids = self.sp.encode("\n" + text)
        return [i + self.text_offset for i in ids[ids.index(self._newline) + 1 :]]

    def tokenize_with_masks(self, text: str, mask_appended: bool = False) -> list[int]:
        """Ids of text in which `[MASK]`, `[sMASK]` and `[gMASK]` stand for their special tokens.

        `mask_appended`: a mask token will follow the text (generate.py appends `[gMASK]`).
        """
        ids: list[int] = []
        pieces = MASK_PATTERN.split(text)  # text, mask, text, ..., text
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.get_command(piece))
            elif piece:
                before_mask = i + 1 < len(pieces) or mask_appended
                ids += self.tokenize_segment(piece, after_mask=i > 0, before_mask=before_mask)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids; special tokens are written as ``[name]`` (``[MASK]`` -> ``[[MASK]]``)."""
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if token in self._decoder:
                parts.append(self._decode_text(run))
                parts.append(f"[{self._decoder[token]}]")
                run = []
            elif self.text_offset <= token < self.text_end:
                run.append(token - self.text_offset)
            # Anything else (image ids, padding rows of the embedding) is skipped.
        parts.append(self._decode_text(run))
        return "".join(parts)

    def _decode_text(self, sp_ids: list[int]) -> str:
        text = self.sp.decode(sp_ids) if sp_ids else ""
        if self.kind == "icetk":
            text = text.replace("<n>", "\n")  # icetk's IceTokenizer.decode does this after DecodeIds
        return text

    def get_command(self, name: str) -> int:
        """Id of a special token: one of SPECIAL_TOKENS, "eos" or "pad"."""
        try:
            return self._commands[name]
        except KeyError:
            raise KeyError(f"unknown command {name!r}; known: {', '.join(self._commands)}") from None

    def id_to_token(self, token_id: int) -> str:
        """Readable form of one id (SAT's IdToToken): ``[name]`` for specials, ``[pad]`` for pad."""
        if token_id in self._decoder:
            return f"[{self._decoder[token_id]}]"
        if token_id == self.pad_id:
            return "[pad]"
        return self.detokenize([token_id])

    def token_to_id(self, token: str) -> int:
        """Inverse of id_to_token for ``[pad]`` and special names; else the first id of the text."""
        if token == "[pad]":
            return self.pad_id
        if token in self._commands:
            return self._commands[token]
        return self.tokenize(token)[0]

    @property
    def vocab_size(self) -> int:
        """Number of meaningful ids (the embedding may be padded beyond it)."""
        return self.special_base + len(SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        return self._commands["eos"]

    @property
    def pad_id(self) -> int:
        return self._commands["pad"]

    @property
    def sop_id(self) -> int:
        return self._commands["sop"]

    @property
    def eop_id(self) -> int:
        return self._commands["eop"]

    @property
    def mask_ids(self) -> dict[str, int]:
        """``{"[MASK]": id, "[gMASK]": id, "[sMASK]": id}``."""
        return {name: self._commands[name] for name in MASK_TOKENS}

    @property
    def end_ids(self) -> list[int]:
        """Tokens that end generation: [eop, eos]."""
        return [self.eop_id, self.eos_id]

    def is_special(self, token_id: int) -> bool:
        """True for the 8 added special tokens (not eos, which is a text id)."""
        return self.special_base <= token_id < self.vocab_size

    def to_config(self) -> dict:
        """Minimal description to rebuild this tokenizer with from_config."""
        return {"type": self.kind, "file": self.model_file.name}

    @classmethod
    def from_config(cls, config: dict, folder: Path) -> GLMTokenizer:
        """Rebuild from to_config's dict; the file is looked up in ``folder``."""
        kind = config.get("type")
        path = Path(folder) / config["file"]
        if kind == "icetk":
            default = ICETK_DEFAULT_FILE.expanduser()
            if not path.is_file() and not default.is_file():
                raise FileNotFoundError(
                    f"icetk text model not found at {path} or {default}: copy ice_text.model to either"
                )
            return cls.icetk(path if path.is_file() else default)
        if kind == "sentencepiece":
            return cls.sentencepiece(path)
        raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {KINDS}")
