"""Triton kernels of dapo-mcore (GPU path), importable as ``dapo_kernels``.

Run on CPU tensors only under ``TRITON_INTERPRET=1`` (tests); the CPU production path is the
C++ library in ``csrc/``. The module exposes the backend contract of
:mod:`dapo_mcore.ops.reference` (used by :mod:`dapo_mcore.ops.dispatch`); triton is imported
lazily so that ``import dapo_kernels`` works where triton cannot initialise.
"""
from __future__ import annotations

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
