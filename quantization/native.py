"""Small C++ CPU kernels, compiled on first use with torch.utils.cpp_extension and cached.

The build lands in torch's extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) and is
reused by every later process with the same source and flags. Without a compiler, without AVX2, or with
GLM_NATIVE=0 the callers fall back to torch's own ops, so the project runs everywhere; only the speed differs.

`GLM_NATIVE_ISA` picks the kernels' instruction set instead of the best one this CPU has: `none` (torch's
ops), `avx2` (AVX2 + FMA + F16C), `avx512` (AVX-512 F, BW, VL, DQ beside those, as torch's own "AVX512"
capability requires). Each build is its own module (`<name>_<isa>`), compiled from the same source: the
kernels are written once against glm/kernels/simd.h, which maps them to the build's vector width. Tests
run with each value the machine supports, so one machine checks every path it can take.
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
ISA_FLAGS = {
    "avx2": AVX2_FLAGS,
    "avx512": [*AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
ISAS = tuple(ISA_FLAGS)  # the builds of the kernels, best last
_CAPABILITY_ISAS = {"AVX2": ["avx2"], "AVX512": ["avx2", "avx512"]}  # torch's name for the CPU's best


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in _CAPABILITY_ISAS


def supported_isas() -> list[str]:
    """The kernel builds this CPU can run, best last."""
    return list(_CAPABILITY_ISAS.get(torch.backends.cpu.get_cpu_capability(), []))


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
    """The module built from `source` for the selected instruction set (headers next to it are found),
    or None where it cannot be built."""
    isa = selected_isa()
    if isa is None:
        return None
    name = f"{name}_{isa}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            print(f"glm: compiling the {name} CPU kernels (once; cached by torch)", file=sys.stderr)
        return load(
            name=name,
            sources=[str(source)],
            extra_include_paths=[str(source.parent)],
            extra_cflags=ISA_FLAGS[isa],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: torch's built-in ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"{name} CPU kernels not compiled ({first}); using torch's slower built-ins", stacklevel=2
        )
        return None
