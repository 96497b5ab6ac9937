"""Plain PyTorch references of the fused ops (tests, the debugging fallback ``impl="reference"``).

Two kinds live here:
- the naive autograd formulas (:func:`naive_target_logprob`, :func:`dapo_loss_reference`) that
  tests and ``scripts/bench_kernels.py`` compare against: they materialise ``[T, V]`` logits;
- the backend functions (``target_logprob_fwd`` / ``target_logprob_bwd`` / ``dapo_loss_fwd`` /
  ``dapo_loss_bwd``) with the same contract as the C++ and Triton kernels, so the reference can
  stand in for them inside the autograd Functions (including the vocab-parallel TP path).
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_target_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[t, targets[t]]`` by autograd: hidden [T, H], weight [V, H],
    targets int [T] (< 0: ignored, logp 0, no gradient) -> logp [T] in the accumulation dtype.

    The logits GEMM runs in the input dtype (as the usual ``logits = h @ W.T`` path does); the
    softmax in float32 (float64 for float64 inputs).
    """
    logits = hidden @ weight.t()
    logp_all = torch.log_softmax(logits.to(acc_dtype(hidden.dtype)), dim=-1)
    safe = targets.clamp_min(0).long()
    logp = logp_all.gather(1, safe[:, None]).squeeze(1)
    return torch.where(targets >= 0, logp, torch.zeros_like(logp))


def dapo_loss_reference(logp: torch.Tensor, ref_logp: torch.Tensor, segment_ids: torch.Tensor,
                        advantages: torch.Tensor, beta: float, normalizer: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO loss by autograd: logp, ref_logp [T]; segment_ids int [T] in [-1, S); advantages [S].

    Returns (loss = sum_s 1/2 (A_s/beta - r_s)^2 / normalizer, r [S] = per-action log-ratio).
    """
    acc = acc_dtype(logp.dtype)
    keep = segment_ids >= 0
    diff = (logp.to(acc) - ref_logp.to(acc))[keep]
    ratio = torch.zeros(advantages.shape[0], dtype=acc, device=logp.device).index_add(
        0, segment_ids[keep].long(), diff)
    loss = 0.5 * ((advantages.to(acc) / beta - ratio) ** 2).sum() / normalizer
    return loss, ratio


# ---- backend contract (same as csrc/*.cpp and dapo_kernels) ----

def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(hidden.dtype)
    return hidden.to(acc) @ weight.to(acc).t()


def _local_cols(targets: torch.Tensor, vocab_start: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    col = targets.long() - vocab_start
    inside = (targets >= 0) & (col >= 0) & (col < v_local)
    return col.clamp(0, v_local - 1), inside


def target_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                       block_t: int | None = None, block_v: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max [T], sumexp [T] relative to max, target_logit [T], 0 outside the shard) of one shard."""
    z = _logits(hidden, weight)
    m = z.max(dim=1).values if z.shape[0] else z.new_zeros(0)
    s = torch.exp(z - m[:, None]).sum(dim=1)
    col, inside = _local_cols(targets, vocab_start, weight.shape[0])
    tgt = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(m))
    return m, s, tgt


def target_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logp: torch.Tensor, vocab_start: int, block_t: int | None = None,
                       block_v: int | None = None, main_grad: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_hidden [T, H] of this shard, grad_weight [V_local, H]) in the input dtype.

    With ``main_grad`` ([V_local, H] in the accumulation dtype) grad_weight is added into it
    instead and None is returned in its place.
    """
    acc = acc_dtype(hidden.dtype)
    z = _logits(hidden, weight)
    col, inside = _local_cols(targets, vocab_start, weight.shape[0])
    g = torch.where(targets >= 0, grad_logp.to(acc), torch.zeros((), dtype=acc, device=z.device))
    grad_z = -g[:, None] * torch.exp(z - lse.to(acc)[:, None])
    grad_z.scatter_add_(1, col[:, None], torch.where(inside, g, torch.zeros_like(g))[:, None])
    grad_h = grad_z @ weight.to(acc)
    grad_w = grad_z.t() @ hidden.to(acc)
    if main_grad is not None:
        main_grad.add_(grad_w)
        return grad_h.to(hidden.dtype), None
    return grad_h.to(hidden.dtype), grad_w.to(weight.dtype)


def dapo_loss_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor,
                  beta: float, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], log_ratio [S]) without autograd."""
    with torch.no_grad():
        return dapo_loss_reference(logp, ref_logp, segment_ids, advantages, beta, normalizer)


def dapo_loss_bwd(grad_loss: torch.Tensor, log_ratio: torch.Tensor, segment_ids: torch.Tensor,
                  advantages: torch.Tensor, beta: float, normalizer: float) -> torch.Tensor:
    """dL/dlogp [T] = -grad_loss (A_s/beta - r_s) / normalizer on tokens of action s, else 0."""
    coef = -grad_loss.to(log_ratio.dtype) * (advantages.to(log_ratio.dtype) / beta - log_ratio) / normalizer
    seg = segment_ids.long()
    return torch.where(seg >= 0, coef[seg.clamp_min(0)] if coef.numel() else torch.zeros_like(seg, dtype=coef.dtype),
                       torch.zeros((), dtype=coef.dtype, device=coef.device))


def fused_loss_bytes_per_token(hidden: torch.Tensor, V_local: int) -> float:
    """Bytes per token of the logits z that :func:`fused_loss_logits` keeps for :func:`fused_loss_grads`
    (the unit of the fused loss's chunk budget): ``V_local`` elements of the accumulation dtype."""
    return V_local * acc_dtype(hidden.dtype).itemsize


def fused_loss_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                      workspace: torch.Tensor | None = None, block_t: int | None = None, block_v: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sumexp, target_logit) [T] as :func:`target_logprob_fwd`, and the logits z [T, V_local]
    (accumulation dtype) for :func:`fused_loss_grads`. ``workspace`` is ignored here."""
    z = _logits(hidden, weight)
    m = z.max(dim=1).values if z.shape[0] else z.new_zeros(0)
    s = torch.exp(z - m[:, None]).sum(dim=1)
    col, inside = _local_cols(targets, vocab_start, weight.shape[0])
    tgt = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(m))
    return m, s, tgt, z


def fused_loss_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     coef: torch.Tensor, z: torch.Tensor, vocab_start: int, grad_hidden: torch.Tensor | None,
                     grad_weight: torch.Tensor | None, block_t: int | None = None, block_v: int | None = None) -> None:
    """``G = coef[t] * (onehot(y_t) - exp(z - lse))`` (coef 0 on rows with targets < 0); writes
    ``grad_hidden [T, H] = G @ W`` and adds ``G^T @ h`` into ``grad_weight [V_local, H]`` (both in the
    accumulation dtype, contiguous; None: skipped). z may be overwritten."""
    acc = acc_dtype(hidden.dtype)
    col, inside = _local_cols(targets, vocab_start, weight.shape[0])
    c = coef.to(acc)
    G = -c[:, None] * torch.exp(z - lse.to(acc)[:, None])
    G.scatter_add_(1, col[:, None], torch.where(inside, c, torch.zeros_like(c))[:, None])
    if grad_hidden is not None:
        grad_hidden.copy_(G @ weight.to(acc))
    if grad_weight is not None:
        grad_weight.add_(G.t() @ hidden.to(acc))


def naive_dapo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor,
                    segment_ids: torch.Tensor, advantages: torch.Tensor, beta: float, normalizer: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused chain by autograd (materialises ``[T, V]`` logits): :func:`naive_target_logprob` then
    :func:`dapo_loss_reference`. Returns (loss [], log_ratio [S], logp [T]); logp is 0 where
    ``segment_ids < 0`` or ``targets < 0``."""
    t = torch.where(segment_ids >= 0, targets.long(), torch.full_like(targets.long(), -1))
    logp = naive_target_logprob(hidden, weight, t)
    loss, ratio = dapo_loss_reference(logp, ref_logp, segment_ids, advantages, beta, normalizer)
    return loss, ratio, logp


def chunked_target_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int = 1024) -> torch.Tensor:
    """The token-chunked PyTorch method (what NeMo-RL and NeMo-Automodel ship; a baseline of the benchmarks):
    per chunk of ``chunk`` tokens ``logits = h_c @ W.T`` (input dtype), ``gather - logsumexp`` in fp32, under
    non-reentrant activation checkpointing, so the backward recomputes each chunk's logits (8·T·H·V FLOPs,
    ``[chunk, V]`` memory). hidden [T, H], weight [V, H], targets int [T] (all valid) -> logp [T] fp32."""
    from torch.utils.checkpoint import checkpoint

    def one(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        logits = (hc @ weight.t()).to(acc_dtype(hidden.dtype))
        return logits.gather(1, yc[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    return torch.cat([checkpoint(one, hidden[i:i + chunk], targets[i:i + chunk].long(), use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])
