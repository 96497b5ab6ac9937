"""Choice of the backend that runs a fused op: ``triton`` (CUDA), ``cpp`` (CPU, csrc/) or
``reference`` (plain PyTorch, any device).

``impl=None`` reads the env var ``DAPO_OPS_IMPL`` (``auto`` when unset): CUDA tensors -> Triton,
CPU tensors -> the C++ library (or the reference, with a warning, if the library is not built).
``impl="triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

IMPLS = ("auto", "triton", "cpp", "reference")
ENV_VAR = "DAPO_OPS_IMPL"


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """The concrete backend name for ``impl`` (or $DAPO_OPS_IMPL) on ``device``."""
    name = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    if name not in IMPLS:
        raise ValueError(f"unknown ops impl {name!r} (from {'argument' if impl else ENV_VAR}); expected one of {IMPLS}")
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        from dapo_mcore import _C

        if _C.available():
            return "cpp"
        warnings.warn("dapo-mcore C++ ops are not built: falling back to the PyTorch reference "
                      "(run `python -m dapo_mcore.build_ops`)", RuntimeWarning, stacklevel=3)
        return "reference"
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"impl='cpp' runs on CPU tensors only, got device {device}")
    return name


def backend(name: str) -> ModuleType:
    """Module exposing target_logprob_fwd/_bwd and dapo_loss_fwd/_bwd for a resolved impl name."""
    if name == "reference":
        from dapo_mcore.ops import reference

        return reference
    if name == "cpp":
        from dapo_mcore.ops import cpp_backend

        return cpp_backend
    if name == "triton":
        import dapo_kernels

        return dapo_kernels
    raise ValueError(f"no backend named {name!r}")
