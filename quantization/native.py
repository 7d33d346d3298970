"""Small C++ CPU kernels, compiled on first use with torch.utils.cpp_extension and cached.

The build lands in torch's extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) and is
reused by every later process with the same source and flags. Without a compiler, without AVX2, or with
GLM_NATIVE=0 the callers fall back to torch's own ops, so the project runs everywhere; only the speed differs.
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


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def load_extension(name: str, source: Path) -> ModuleType | None:
    """The compiled module built from `source` (AVX2 + FMA + F16C), or None where it cannot be built."""
    if os.environ.get("GLM_NATIVE", "1") == "0" or not has_avx2():
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
