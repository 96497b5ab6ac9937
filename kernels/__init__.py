"""Triton kernels of dapo-mcore (GPU path), importable as ``dapo_kernels``.

Run on CPU tensors only under ``TRITON_INTERPRET=1`` (tests); the CPU production path is the
C++ library in ``csrc/``. The module exposes the backend contract of
:mod:`dapo_mcore.ops.reference` (used by :mod:`dapo_mcore.ops.dispatch`); triton is imported
lazily so that ``import dapo_kernels`` works where triton cannot initialise.
"""
from __future__ import annotations

import sys

if __name__ == "kernels":
    # Imported under the folder's own name: the repository root is on sys.path (``python -m ...`` or
    # ``python -c`` run from the checkout) and this folder shadows PyPI's ``kernels`` (Hugging Face's hub
    # kernels, a dependency of transformers >= 5.25). Load that package in this module's place; where it is
    # not installed, become what a code-less folder of that name would be, an empty namespace package
    # (no __file__, no __version__), which availability checks such as transformers' read as "not
    # installed" (raising here instead breaks ``import transformers`` < 5.25 run from the checkout).
    # This folder is only ever ``dapo_kernels``.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _path = [p for p in sys.path if os.path.realpath(os.path.abspath(p or os.curdir)) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        sys.modules["kernels"] = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec("kernels", None, is_package=True))
    else:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            del sys.modules["kernels"]
            raise

_EXPORTS = {
    "target_logprob_fwd": "dapo_kernels.target_logprob",
    "target_logprob_bwd": "dapo_kernels.target_logprob",
    "dapo_loss_fwd": "dapo_kernels.dapo_loss",
    "dapo_loss_bwd": "dapo_kernels.dapo_loss",
    "fused_loss_logits": "dapo_kernels.fused_dapo_loss",
    "fused_loss_grads": "dapo_kernels.fused_dapo_loss",
    "fused_loss_bytes_per_token": "dapo_kernels.fused_dapo_loss",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dapo_kernels' has no attribute {name!r}")
