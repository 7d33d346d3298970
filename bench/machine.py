"""The machine a benchmark ran on, named beside its numbers (no torch import: cheap for parent processes)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_description() -> str:
    """The CPU's name and how many CPUs the machine has."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs"
