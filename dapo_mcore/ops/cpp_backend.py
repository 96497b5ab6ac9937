"""The C++ CPU kernels (``torch.ops.dapo_mcore``, built from csrc/) behind the backend contract
of :mod:`dapo_mcore.ops.reference`."""
from __future__ import annotations

import torch

from dapo_mcore import _C

BLOCK_T = 256  # tokens per tile: the [BLOCK_T, BLOCK_V] fp32 logits tile (512 KiB) stays in L2
BLOCK_V = 512  # vocab rows per chunk (threads take whole chunks)
# The fused loss's vocab block (csrc/fused_dapo_loss.cpp, panel and blocked paths; the flat path ignores it):
# a thread's fp32 logits tile [128, ~440 tokens] (220 KiB) and its bf16 W block (224 KiB at H = 896) sit well
# inside a 1 MiB L2. Measured on Zen 5 (docs/kernels.md): bf16 fused loss 2.7-2.8 s at 128 vs 3.0 s at 256 and
# 3.2-3.8 s at 512; flat on Zen 4 (128-1024).
LOSS_BLOCK_V = 128


def target_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                       block_t: int | None = None, block_v: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _C.load().target_logprob_fwd(hidden, weight, targets.long(), vocab_start,
                                        block_t or BLOCK_T, block_v or BLOCK_V)


def target_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logp: torch.Tensor, vocab_start: int, block_t: int | None = None,
                       block_v: int | None = None, main_grad: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    gh, gw = _C.load().target_logprob_bwd(hidden, weight, targets.long(), lse, grad_logp, vocab_start,
                                          block_t or BLOCK_T, block_v or BLOCK_V, main_grad)
    return gh, (None if main_grad is not None else gw)


def dapo_loss_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor,
                  beta: float, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _C.load().dapo_loss_fwd(logp, ref_logp, segment_ids.long(), advantages, beta, normalizer)


def dapo_loss_bwd(grad_loss: torch.Tensor, log_ratio: torch.Tensor, segment_ids: torch.Tensor,
                  advantages: torch.Tensor, beta: float, normalizer: float) -> torch.Tensor:
    return _C.load().dapo_loss_bwd(grad_loss, log_ratio, segment_ids.long(), advantages, beta, normalizer)


def fused_loss_bytes_per_token(hidden: torch.Tensor, V_local: int, block_v: int | None = None) -> float:
    """Workspace bytes per token of :func:`fused_loss_logits` for ``hidden``'s dtype and width (the chunk
    budget's unit): ~4·V for fp32 logits, ~2·V on the bf16 panel path (``csrc/fused_dapo_loss.cpp``);
    ``block_v`` default ``LOSS_BLOCK_V``, as for the two kernels below."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return _C.load().fused_loss_z_numel(hidden, 1024, V_local, block_v or LOSS_BLOCK_V) * acc.itemsize / 1024


def fused_loss_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                      workspace: torch.Tensor | None = None, block_t: int | None = None, block_v: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bv = block_v or LOSS_BLOCK_V
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    need = _C.load().fused_loss_z_numel(hidden, hidden.shape[0], weight.shape[0], bv)
    if workspace is not None and workspace.dtype == acc and workspace.numel() >= need:
        z = workspace.view(-1)[:need]
    else:
        z = torch.empty(need, dtype=acc)
    m, s, tgt = _C.load().fused_loss_logits(hidden, weight, targets.long(), vocab_start, bv, z)
    return m, s, tgt, z


def fused_loss_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     coef: torch.Tensor, z: torch.Tensor, vocab_start: int, grad_hidden: torch.Tensor | None,
                     grad_weight: torch.Tensor | None, block_t: int | None = None, block_v: int | None = None) -> None:
    _C.load().fused_loss_grads(hidden, weight, targets.long(), lse, coef, z, vocab_start, block_v or LOSS_BLOCK_V,
                               grad_hidden, grad_weight)


def bf16_gemm_engine() -> str:
    """The CPU kernels' bf16 GEMM: ``"amx"`` (oneDNN brgemm), ``"avx512_bf16"`` or ``"none"`` (upcast)."""
    return _C.load().bf16_gemm_engine()
