"""Loader of the compiled CPU op library (``torch.ops.dapo_mcore``).

The library is built from ``csrc/`` by ``scripts/setup.sh`` (``python -m dapo_mcore.build_ops``).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

LIB_PATH = Path(__file__).resolve().parent / "_lib" / "libdapo_mcore_ops.so"


@functools.lru_cache(maxsize=None)
def load() -> object:
    """Load the op library once and return ``torch.ops.dapo_mcore``.

    Raises:
        RuntimeError: the library was not built (run ``scripts/setup.sh``).
    """
    if not LIB_PATH.exists():
        raise RuntimeError(
            f"dapo-mcore CPU ops are not built ({LIB_PATH} missing): run scripts/setup.sh "
            "or `python -m dapo_mcore.build_ops`")
    torch.ops.load_library(str(LIB_PATH))
    return torch.ops.dapo_mcore


def available() -> bool:
    """True if the compiled library exists and loads."""
    try:
        load()
        return True
    except (RuntimeError, OSError):
        return False
