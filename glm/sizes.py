"""Byte sizes as the flags write them (`--max-memory 22GiB`, `25%`), and back. Imports no torch: run configs
are checked with it while the command line is parsed."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_UNITS |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(text: str | int, total: int | None = None) -> int:
    """Bytes from '22GiB', '22GB', '500MiB', '1e9' or an int; '25%' is a share of `total`."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().replace(" ", "")
    if value.endswith("%"):
        if total is None:
            raise ValueError(f"memory '{text}': a percentage needs the model's size")
        return int(float(value[:-1]) / 100 * total)
    match = re.fullmatch(r"([0-9.e+]+)([kmgt]i?b|b)?", value)
    if not match:
        raise ValueError(f"memory '{text}' is not a size: write e.g. 22GiB, 500MB or 25%")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def format_bytes(n: float) -> str:
    """'512 B', '1.50 KiB' ... '22.00 GiB' (GiB is the largest unit)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
