"""Small C++ CPU kernels, compiled on first use with torch.utils.cpp_extension and cached.

The build lands in torch's extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) and is
reused by every later process with the same source and flags. Without a compiler, without AVX2, or with
GLM_NATIVE=0 the callers fall back to torch's own ops, so the project runs everywhere; only the speed differs.

`GLM_NATIVE_ISA` picks the kernels' instruction set instead of the best one this CPU has: `none` (torch's
ops), `avx2` (the AVX2 + FMA + F16C build, today the only one). Tests run with each value the machine
supports, so one machine checks every path it can take.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


ISAS = ("avx2",)  # the builds of the kernels, best last


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def supported_isas() -> list[str]:
    """The kernel builds this CPU can run."""
    return list(ISAS) if has_avx2() else []  # every build needs AVX2 (today's one is AVX2)


def selected_isa() -> str | None:
    """The build the kernels use: GLM_NATIVE_ISA, else the best this CPU supports; None: torch's ops."""
    requested = os.environ.get("GLM_NATIVE_ISA", "auto")
    if os.environ.get("GLM_NATIVE", "1") == "0" or requested == "none":
        return None
    supported = supported_isas()
    if requested == "auto":
        return supported[-1] if supported else None
    if requested not in ISAS:
        raise ValueError(f"GLM_NATIVE_ISA={requested}: choose auto, none or {', '.join(ISAS)}")
    if requested not in supported:
        raise ValueError(f"GLM_NATIVE_ISA={requested}: this CPU lacks it; it supports {supported or 'none'}")
    return requested


@functools.cache
def load_extension(name: str, source: Path) -> ModuleType | None:
    """The compiled module built from `source` (AVX2 + FMA + F16C), or None where it cannot be built."""
    if selected_isa() is None:
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            print(f"glm: compiling the {name} CPU kernels (once; cached by torch)", file=sys.stderr)
        return load(
            name=name,
            sources=[str(source)],
            extra_cflags=AVX2_FLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: torch's built-in ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"{name} CPU kernels not compiled ({first}); using torch's slower built-ins", stacklevel=2
        )
        return None
