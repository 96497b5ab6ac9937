"""Fused DAPO loss (Direct Advantage Policy Optimization, arXiv 2412.18279, Stage 5) straight from the
last hidden states and the (vocab-parallel) output weight: logits once, 6·T·H·V FLOPs, no ``[T, V]``
tensor.

The per-token op plus :func:`dapo_loss` costs 8·T·H·V: its backward recomputes the logits because
dL/dlogp is only known after the loss. But a token's DAPO gradient depends only on its own action's
log-ratio sum, so a token chunk cut on action boundaries can do everything in one pass while its
logits are at hand:

1. ``z = h_c @ W^T`` (kept for this chunk only), per-token max / sum-exp / target logit, all-reduced
   over the TP vocab shards -> ``lse``, ``logp_t = z[t, y_t] - lse_t``;
2. ``r_s = sum_{t in s} (logp_t - ref_logp_t)`` for the chunk's (whole) actions, their loss terms and
   ``coef_t = -(A_s/beta - r_s) / normalizer`` (= dL/dlogp_t);
3. ``G = coef * (onehot(y) - softmax(z))``, ``grad_hidden_c = G @ W`` (all-reduced over TP) and
   ``grad_weight += G^T @ h_c`` (into Megatron's fp32 ``main_grad`` when the weight has one).

The gradients are therefore computed in the FORWARD (with upstream gradient ``grad_scale``, default 1)
and the backward only scales grad_hidden; see :func:`fused_dapo_loss` for what that implies.
Backends (``dapo_mcore/ops/dispatch.py``): C++ (``csrc/fused_dapo_loss.cpp``) on CPU, Triton
(``kernels/fused_dapo_loss.py``) on CUDA, the PyTorch reference (``impl="reference"``); each implements
``fused_loss_logits`` / ``fused_loss_grads`` (:mod:`dapo_mcore.ops.reference` documents the contract).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from dapo_mcore.ops.dispatch import backend, resolve_impl
from dapo_mcore.ops.reference import acc_dtype
from dapo_mcore.ops.target_logprob import _fusable_main_grad, dummy_weight_grad, shard_logprobs

# Bytes of one chunk's logits workspace (fp32 z [chunk, V_local]: 4·V_local per token; the C++ bf16 panel
# path keeps exp(z - block max) in bf16: ~2·V_local). Every chunk reads W twice and reads + writes all of
# grad_weight (main_grad, fp32) once, so larger chunks mean less memory traffic per FLOP: on CPU 128 MiB
# (~200 tokens of fp32 logits at V = 152k, ~440 on the panel path: the weight-gradient GEMM's K) keeps the
# peak under 1/20 of naive's; on a GPU 1 GiB (the per-chunk main_grad read-modify-write must stay below the
# chunk's GEMM time: docs/kernels.md).
CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}


class FusedDapoLossOutput(NamedTuple):
    loss: torch.Tensor       # [] fp32 (fp64 for fp64 inputs), differentiable in hidden and weight
    log_ratio: torch.Tensor  # [S] per-action log pi/pi_ref, detached
    logp: torch.Tensor       # [T] per-token log pi_theta, detached; 0 where segment_ids < 0 or targets < 0


def action_chunks(seg_sorted: torch.Tensor, max_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of whole actions over tokens grouped by action (``seg_sorted``
    non-decreasing), filled greedily up to ``max_tokens``; an action longer than that is a chunk alone."""
    n = seg_sorted.numel()
    if n == 0:
        return []
    ends = (torch.nonzero(seg_sorted[1:] != seg_sorted[:-1]).squeeze(1) + 1).tolist() + [n]
    chunks, start, prev = [], 0, 0
    for e in ends:
        if e - start > max_tokens and prev > start:
            chunks.append((start, prev))
            start = prev
        prev = e
    chunks.append((start, n))
    return chunks


def chunk_token_budget(be, hidden: torch.Tensor, V_local: int, chunk_bytes: Optional[int]) -> int:
    """Tokens per chunk: ``chunk_bytes`` (default ``CHUNK_BYTES`` of the device) over the backend's
    workspace bytes per token (``fused_loss_bytes_per_token``: ~4·V_local for fp32 logits)."""
    budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES["cuda" if hidden.device.type == "cuda" else "cpu"]
    return max(1, int(budget // be.fused_loss_bytes_per_token(hidden, max(V_local, 1))))


class _FusedDapoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_logp, segment_ids, advantages, beta, normalizer, tp_group, impl,
                chunk_bytes, fuse_param, want_grad, grad_scale):
        be = backend(impl)
        T, H = hidden.shape
        V, S = weight.shape[0], advantages.shape[0]
        acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        vocab_start = dist.get_rank(tp_group) * V if tp_group is not None else 0
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        seg = segment_ids.long()
        active = torch.nonzero(seg >= 0).squeeze(1)
        order = active[torch.argsort(seg[active], stable=True)]      # tokens grouped by action
        h_a = hidden.index_select(0, order).contiguous()
        y_a = targets.long().index_select(0, order)
        seg_a = seg.index_select(0, order)
        ref_a = ref_logp.index_select(0, order).to(acc)
        adv = advantages.to(acc)
        n_a = order.numel()
        logp_a = torch.zeros(n_a, dtype=acc, device=dev)
        ratio = torch.zeros(S, dtype=acc, device=dev)
        main_grad = _fusable_main_grad(fuse_param[0]) if (need_w and fuse_param is not None) else None
        gh_a = torch.empty(n_a, H, dtype=acc, device=dev) if need_h else None
        gw = main_grad if main_grad is not None else (torch.zeros(V, H, dtype=acc, device=dev) if need_w else None)
        ws = None
        for a, b in action_chunks(seg_a, chunk_token_budget(be, hidden, V, chunk_bytes)):
            hc, yc, sc = h_a[a:b], y_a[a:b], seg_a[a:b]
            m, s, tgt, z = be.fused_loss_logits(hc, weight, yc, vocab_start, workspace=ws)
            ws = z
            lp, lse = shard_logprobs(m, s, tgt, yc, tp_group)
            logp_a[a:b] = lp
            ratio.index_add_(0, sc, lp - ref_a[a:b])          # the chunk holds these actions whole
            if need_h or need_w:
                coef = -(adv[sc] / beta - ratio[sc]) * (grad_scale / normalizer)
                coef = torch.where(yc >= 0, coef, torch.zeros_like(coef))
                be.fused_loss_grads(hc, weight, yc, lse, coef, z, vocab_start,
                                    gh_a[a:b] if gh_a is not None else None, gw)
        if gh_a is not None and tp_group is not None:
            dist.all_reduce(gh_a, group=tp_group)
        loss = 0.5 * ((adv / beta - ratio) ** 2).sum() / normalizer
        logp = torch.zeros(T, dtype=acc, device=dev).index_copy_(0, order, logp_a)
        ctx.save_for_backward(order, *( [gh_a] if gh_a is not None else []))
        ctx.cfg = (T, H, hidden.dtype, weight.dtype, weight.shape, grad_scale, need_h, need_w)
        ctx.gw = gw if main_grad is None else None
        ctx.fuse_param = fuse_param if main_grad is not None else None
        ctx.mark_non_differentiable(ratio, logp)
        return loss, ratio, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_ratio, _grad_logp):
        T, H, h_dtype, w_dtype, w_shape, grad_scale, need_h, need_w = ctx.cfg
        saved = ctx.saved_tensors
        order = saved[0]
        scale = grad_loss.reshape(()) / grad_scale
        grad_h = grad_w = None
        if need_h:
            grad_h = torch.zeros(T, H, dtype=h_dtype, device=order.device)
            grad_h.index_copy_(0, order, (saved[1] * scale).to(h_dtype))
        if need_w:
            if ctx.fuse_param is not None:
                g = float(grad_loss)
                if g != grad_scale:
                    raise RuntimeError(
                        f"fused_dapo_loss added grad_weight into weight.main_grad during the forward for an upstream "
                        f"gradient of {grad_scale}, but the backward received {g}: pass grad_scale={g} (e.g. the fp16 "
                        f"loss scale) or accumulate_into_main_grad=False")
                grad_w = dummy_weight_grad(ctx.fuse_param[0])
            else:
                grad_w = (ctx.gw * scale).to(w_dtype)
        return (grad_h, grad_w) + (None,) * 12


def fused_dapo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor,
                    segment_ids: torch.Tensor, advantages: torch.Tensor, beta: float, *,
                    normalizer: Optional[float] = None, tp_group: Optional[dist.ProcessGroup] = None,
                    impl: Optional[str] = None, chunk_bytes: Optional[int] = None,
                    accumulate_into_main_grad: bool = True, grad_scale: float = 1.0) -> FusedDapoLossOutput:
    """The DAPO actor loss of a micro-batch from hidden states, in one fused pass (module docstring).

    ``loss = sum_s 1/2 (A_s / beta - r_s)^2 / normalizer``, ``r_s = sum_{t: segment_ids[t] = s}
    (logp_t - ref_logp_t)``, ``logp_t = log_softmax(hidden @ weight.T)[t, targets[t]]`` — exactly
    :func:`fused_target_logprob` followed by :func:`dapo_loss` (tested equal, loss and gradients).
    The paper's objective is ½·mean over actions of (A/β − log π_θ(a|s)/π_ref(a|s))²: with Megatron's
    per-token loss protocol (``calculate_per_token_loss``, what ``dapo_mcore/actor/train.py`` does)
    pass ``normalizer=1.0`` and report ``count = S`` (the micro-batch's action count); Megatron adds the
    sums and the counts over micro-batches and data-parallel ranks and divides once, so the objective
    does not change with micro-batching. Standalone, the default ``normalizer=S`` is the mean.

    Args:
        hidden: ``[T, H]`` bf16/fp16/fp32/fp64, the last hidden states of the packed tokens.
        weight: ``[V_local, H]`` same dtype, the output layer (this rank's vocab shard under TP: ids
            ``[rank*V_local, (rank+1)*V_local)``); may be tied to the embedding.
        targets: int ``[T]`` next-token ids (global); ``< 0`` inside an action: logp 0, no gradient
            (as :func:`fused_target_logprob`'s ignore index).
        ref_logp: ``[T]`` float, per-token log pi_ref (the advantage stage's).
        segment_ids: int ``[T]`` in ``[-1, S)``: the action of each token; -1 (state tokens, padding)
            takes no part (no logits are computed for it). Any order: tokens are grouped by action, and
            chunks of about ``chunk_bytes`` of logits workspace are cut on action boundaries (an action longer
            than a chunk is a chunk alone: memory ``O(max(chunk, longest action) * V_local)``).
        advantages: ``[S]`` float, A_s; an action with no tokens contributes ½(A_s/β)².
        beta: DAPO temperature (> 0; paper 0.01-0.02).
        normalizer: the sum over actions is divided by this (default S).
        tp_group: Megatron's tensor-parallel group (None: the weight is the whole vocab). The op
            all-reduces max / sum-exp / target logits per chunk and grad_hidden, and returns the FULL
            grad_hidden (do not also wrap hidden in ``copy_to_tensor_model_parallel_region``).
        impl: ``"triton"``/``"cpp"``/``"reference"``/``"auto"`` (default $DAPO_OPS_IMPL or auto).
        chunk_bytes: budget of one chunk's logits workspace (default 128 MiB on CPU, 1 GiB on CUDA; see
            ``CHUNK_BYTES``).
        accumulate_into_main_grad: if ``weight`` has a fusable ``main_grad`` (Megatron DDP: fp32, same
            shape), grad_weight is added into it DURING THE FORWARD (when grad is enabled and the weight
            requires grad) and the backward hands autograd Megatron's dummy gradient (zeros when the param
            has ``zero_out_wgrad``, i.e. tied embeddings at PP=1, else ``torch.empty``) with
            ``grad_added_to_main_grad`` set. So: call it once per backward (no activation-recompute of the
            loss), and the upstream gradient of ``loss`` must equal ``grad_scale`` (checked in the backward:
            a mismatch raises). False: grad_weight is kept and returned, scaled by the upstream gradient.
        grad_scale: the upstream gradient the forward assumes (1.0 under Megatron's bf16/fp32 optimizers;
            the loss scale under fp16). grad_hidden is rescaled exactly in the backward in any case.

    Returns:
        FusedDapoLossOutput(loss [], log_ratio [S] detached, logp [T] detached).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_dapo_loss: need hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_dapo_loss: hidden {hidden.dtype} and weight {weight.dtype} differ")
    T = hidden.shape[0]
    for name, t in (("targets", targets), ("ref_logp", ref_logp), ("segment_ids", segment_ids)):
        if t.shape != (T,):
            raise ValueError(f"fused_dapo_loss: {name} must be [T={T}], got {tuple(t.shape)}")
    if targets.dtype.is_floating_point or segment_ids.dtype.is_floating_point:
        raise ValueError(f"fused_dapo_loss: targets and segment_ids must be int tensors, got {targets.dtype}, "
                         f"{segment_ids.dtype}")
    if advantages.dim() != 1:
        raise ValueError(f"fused_dapo_loss: advantages must be [S], got {tuple(advantages.shape)}")
    if not beta > 0:
        raise ValueError(f"fused_dapo_loss: beta must be > 0, got {beta}")
    S = advantages.shape[0]
    if T and (int(segment_ids.min()) < -1 or int(segment_ids.max()) >= S):
        raise ValueError(f"fused_dapo_loss: segment_ids must lie in [-1, S={S}), got [{int(segment_ids.min())}, "
                         f"{int(segment_ids.max())}]")
    norm = float(normalizer) if normalizer is not None else float(max(S, 1))
    if not norm > 0:
        raise ValueError(f"fused_dapo_loss: normalizer must be > 0, got {normalizer}")
    if not grad_scale > 0:
        raise ValueError(f"fused_dapo_loss: grad_scale must be > 0, got {grad_scale}")
    name = resolve_impl(impl, hidden.device)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    fuse = (weight,) if accumulate_into_main_grad and hasattr(weight, "main_grad") else None
    loss, ratio, logp = _FusedDapoLoss.apply(hidden, weight, targets, ref_logp, segment_ids, advantages, float(beta),
                                             norm, tp_group, name, chunk_bytes, fuse, want_grad, float(grad_scale))
    return FusedDapoLossOutput(loss, ratio, logp)
