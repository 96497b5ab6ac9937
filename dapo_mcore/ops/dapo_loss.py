"""DAPO actor loss (arXiv 2412.18279, Stage 5) fused with the per-action segment sums:

    r_s  = sum_{t: segment_ids[t] = s} (logp[t] - ref_logp[t])        (log pi/pi_ref of action s)
    loss = sum_s 1/2 (A_s / beta - r_s)^2 / normalizer                (normalizer: default S)

Tokens with segment id -1 (state tokens, padding) contribute nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from dapo_mcore.ops.dispatch import backend, resolve_impl
from dapo_mcore.ops.reference import dapo_loss_reference


class DapoLossOutput(NamedTuple):
    loss: torch.Tensor       # [] float32 (float64 for float64 logp), differentiable
    log_ratio: torch.Tensor  # [S] per-action log pi/pi_ref, detached (for logging)


class _DapoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, segment_ids, advantages, beta, normalizer, impl):
        loss, ratio = backend(impl).dapo_loss_fwd(logp, ref_logp, segment_ids, advantages, beta, normalizer)
        ctx.save_for_backward(ratio, segment_ids, advantages)
        ctx.cfg = (beta, normalizer, impl, logp.dtype, ref_logp.dtype)
        ctx.mark_non_differentiable(ratio)
        return loss, ratio

    @staticmethod
    def backward(ctx, grad_loss, _grad_ratio):
        ratio, segment_ids, advantages = ctx.saved_tensors
        beta, normalizer, impl, logp_dtype, ref_dtype = ctx.cfg
        g_logp = backend(impl).dapo_loss_bwd(grad_loss.reshape(()).contiguous(), ratio, segment_ids, advantages,
                                             beta, normalizer)
        g_adv = None
        if ctx.needs_input_grad[3]:
            g_adv = (grad_loss * (advantages.to(ratio.dtype) / beta - ratio) / (beta * normalizer)).to(advantages.dtype)
        return (g_logp.to(logp_dtype) if ctx.needs_input_grad[0] else None,
                (-g_logp).to(ref_dtype) if ctx.needs_input_grad[1] else None, None, g_adv, None, None, None)


def dapo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor,
              beta: float, *, normalizer: float | None = None, impl: str | None = None) -> DapoLossOutput:
    """DAPO loss over a batch of actions, differentiable in logp (and ref_logp, advantages).

    Args:
        logp: [T] float, per-token log pi_theta (e.g. from :func:`fused_target_logprob`).
        ref_logp: [T] float, per-token log pi_ref (stored by the advantage stage).
        segment_ids: int [T], the action index of each token in [0, S), or -1 (no action).
        advantages: [S] float, A_s of each action.
        beta: the DAPO temperature (> 0; paper: 0.01-0.02).
        normalizer: the loss is a sum over actions divided by this (default S: the mean over
            actions; pass the global action count when micro-batching).
        impl: backend, as in :func:`dapo_mcore.ops.fused_target_logprob`.

    Returns:
        DapoLossOutput(loss [], log_ratio [S] detached). S = 0 gives loss 0.
    """
    if logp.dim() != 1 or ref_logp.shape != logp.shape or segment_ids.shape != logp.shape:
        raise ValueError(f"dapo_loss: logp, ref_logp, segment_ids must all be [T], got {tuple(logp.shape)}, "
                         f"{tuple(ref_logp.shape)}, {tuple(segment_ids.shape)}")
    if advantages.dim() != 1:
        raise ValueError(f"dapo_loss: advantages must be [S], got {tuple(advantages.shape)}")
    if segment_ids.dtype.is_floating_point:
        raise ValueError(f"dapo_loss: segment_ids must be an int tensor, got {segment_ids.dtype}")
    if not beta > 0:
        raise ValueError(f"dapo_loss: beta must be > 0, got {beta}")
    n_actions = advantages.shape[0]
    if segment_ids.numel() and (int(segment_ids.min()) < -1 or int(segment_ids.max()) >= n_actions):
        raise ValueError(f"dapo_loss: segment_ids must lie in [-1, S={n_actions}), got "
                         f"[{int(segment_ids.min())}, {int(segment_ids.max())}]")
    norm = float(normalizer) if normalizer is not None else float(max(n_actions, 1))
    if not norm > 0:
        raise ValueError(f"dapo_loss: normalizer must be > 0, got {normalizer}")
    name = resolve_impl(impl, logp.device)
    if name == "reference":
        loss, ratio = dapo_loss_reference(logp, ref_logp, segment_ids, advantages, float(beta), norm)
        return DapoLossOutput(loss, ratio.detach())
    loss, ratio = _DapoLoss.apply(logp, ref_logp, segment_ids.long(), advantages, float(beta), norm, name)
    return DapoLossOutput(loss, ratio)
