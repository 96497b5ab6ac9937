"""Fused per-token target log-prob: ``logp[t] = log_softmax(hidden @ weight.T)[t, targets[t]]``
without materialising ``[T, V]`` logits (chunked GEMM + online log-sum-exp; the backward
recomputes each chunk's softmax).

Tensor parallel (Megatron vocab-parallel output layer): ``weight`` is this rank's vocab shard
``[V_local, H]`` covering ids ``[rank * V_local, (rank + 1) * V_local)``; per-shard max and
sum-exp are all-reduced (MAX, then SUM) over ``tp_group``, targets outside the shard contribute
nothing, and the backward all-reduces grad_hidden, so it returns the FULL gradient of hidden.
The caller must therefore NOT also wrap hidden in Megatron's
``copy_to_tensor_model_parallel_region`` (that would all-reduce it twice).

Gradient-accumulation fusion (as Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``):
when ``weight`` carries a ``main_grad`` buffer (Megatron DDP's persistent fp32 grad buffer) of
its shape and the accumulation dtype, the backward ADDS grad_weight into ``weight.main_grad``
(in the C++ kernel: no [V, H] temporary) and returns no fresh gradient. If the param also has
``grad_added_to_main_grad`` (set by Megatron's DDP), that flag is set and autograd gets a dummy
``torch.empty`` gradient, exactly as Megatron does, so DDP's grad-accumulator hook still fires
(required with ``overlap_grad_reduce``: it marks the bucket ready) and discards it without adding
(its pages are never touched: no resident memory on CPU); with ``zero_out_wgrad`` (a weight tied to the
embedding at PP=1) the dummy is zeros, since the embedding's own gradient is summed with it. Without that
attribute the gradient is None (``param.grad`` stays unset).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dapo_mcore.ops.dispatch import backend, resolve_impl


def shard_logprobs(m: torch.Tensor, s: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor,
                   tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` [T] fp32 from one vocab shard's online log-sum-exp statistics (``m`` running max,
    ``s`` sum of exp(z - m), ``tgt`` the target logit or 0 off-shard; [T] fp32), combined over ``tp_group``
    (None: one shard). ``logp`` is 0 where ``targets`` < 0 (ignored tokens)."""
    if tp_group is not None:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
        s = s * torch.exp(m - m_all)
        dist.all_reduce(s, group=tp_group)
        dist.all_reduce(tgt, group=tp_group)
        m = m_all
    lse = m + torch.log(s)
    return torch.where(targets >= 0, tgt - lse, torch.zeros_like(lse)), lse


class _TargetLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, impl, block_t, block_v, fuse_param):
        be = backend(impl)
        vocab_start = dist.get_rank(tp_group) * weight.shape[0] if tp_group is not None else 0
        m, s, tgt = be.target_logprob_fwd(hidden, weight, targets, vocab_start, block_t, block_v)
        logp, lse = shard_logprobs(m, s, tgt, targets, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.cfg = (tp_group, impl, block_t, block_v, vocab_start)
        ctx.fuse_param = fuse_param  # (param,) whose main_grad receives grad_weight, or None
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        tp_group, impl, block_t, block_v, vocab_start = ctx.cfg
        param = ctx.fuse_param[0] if ctx.fuse_param is not None and ctx.needs_input_grad[1] else None
        main_grad = _fusable_main_grad(param) if param is not None else None
        grad_h, grad_w = backend(impl).target_logprob_bwd(
            hidden, weight, targets, lse, grad_logp.contiguous(), vocab_start, block_t, block_v,
            main_grad=main_grad)
        if tp_group is not None:
            dist.all_reduce(grad_h, group=tp_group)
        if main_grad is not None:
            grad_w = dummy_weight_grad(param)
        return (grad_h if ctx.needs_input_grad[0] else None,
                grad_w if ctx.needs_input_grad[1] else None, None, None, None, None, None, None)


def dummy_weight_grad(param: torch.Tensor) -> torch.Tensor | None:
    """What autograd receives for a weight whose gradient went into ``param.main_grad``, as Megatron's
    fused linear does: with Megatron DDP (``grad_added_to_main_grad`` present) the flag is set and a dummy
    is returned so DDP's grad-ready hook fires; the dummy is ZEROS when the param has ``zero_out_wgrad``
    (tied embedding/output weight at PP=1: the embedding's own gradient is summed with it and the hook then
    adds that sum), else an untouched ``torch.empty`` (the hook discards it). Without DDP: None."""
    if not hasattr(param, "grad_added_to_main_grad"):
        return None
    param.grad_added_to_main_grad = True
    if getattr(param, "zero_out_wgrad", False):
        return torch.zeros(param.shape, dtype=param.dtype, device=param.device)
    return torch.empty(param.shape, dtype=param.dtype, device=param.device)


def _fusable_main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight.main_grad`` if grad_weight can be accumulated into it in place: same shape and
    device, contiguous, accumulation dtype (fp32; fp64 for fp64 weights). Else None (the op then
    returns grad_weight and Megatron's hook adds it)."""
    mg = getattr(weight, "main_grad", None)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if (isinstance(mg, torch.Tensor) and mg.shape == weight.shape and mg.dtype == acc and mg.is_contiguous()
            and mg.device == weight.device):
        return mg
    return None


def fused_target_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         tp_group: dist.ProcessGroup | None = None, *, impl: str | None = None,
                         block_t: int | None = None, block_v: int | None = None,
                         accumulate_into_main_grad: bool = True) -> torch.Tensor:
    """Log-prob of each target token under ``softmax(hidden @ weight.T)``, differentiable.

    Args:
        hidden: [T, H] float (bf16/fp16/fp32/fp64), the last hidden states.
        weight: [V_local, H] same dtype, the output layer (this rank's vocab shard under TP).
        targets: int [T] global token ids; ``< 0`` is the ignore index (logp 0, no gradient).
            Ignored rows are dropped before the kernels run, so state tokens cost nothing.
        tp_group: tensor-parallel group (None: the weight is the whole vocab).
        impl: ``"triton"``/``"cpp"``/``"reference"``/``"auto"`` (default: $DAPO_OPS_IMPL or auto).
        block_t, block_v: tile sizes (None: the backend's defaults / autotune).
        accumulate_into_main_grad: if ``weight`` has a fusable ``main_grad`` (Megatron DDP: fp32,
            same shape), add grad_weight into it in the backward instead of returning it (see
            the module docstring). False: always return grad_weight.

    Returns:
        logp [T] float32 (float64 for float64 inputs). Backward gives grad_hidden [T, H]
        (full, all-reduced over tp_group) and grad_weight [V_local, H] in the input dtypes
        (or grad_weight added into ``weight.main_grad``).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_target_logprob: need hidden [T, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"fused_target_logprob: targets must be an int tensor [T={hidden.shape[0]}], "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_target_logprob: hidden {hidden.dtype} and weight {weight.dtype} differ")
    name = resolve_impl(impl, hidden.device)
    fuse = (weight,) if accumulate_into_main_grad and hasattr(weight, "main_grad") else None
    targets = targets.long()
    active = targets >= 0
    if bool(active.all()):
        return _TargetLogprob.apply(hidden, weight, targets, tp_group, name, block_t, block_v, fuse)
    idx = active.nonzero().squeeze(1)
    logp_active = _TargetLogprob.apply(hidden.index_select(0, idx), weight, targets.index_select(0, idx),
                                       tp_group, name, block_t, block_v, fuse)
    return logp_active.new_zeros(targets.shape[0]).index_copy(0, idx, logp_active)
