"""Triton kernels of the DAPO loss fused with the per-action segment sums (GPU path).

fwd: ``_segsum_kernel`` atomically adds (logp - ref_logp) of each token into r[segment] (fp32;
fp64 for fp64 inputs), then ``_loss_kernel`` adds sum_s 1/2 (A_s/beta - r_s)^2 / normalizer
into the scalar loss. bwd: ``_grad_kernel`` writes dL/dlogp[t] = -g (A_s/beta - r_s)/normalizer
for seg_t = s >= 0, else 0. Atomic float adds make the GPU sums order-nondeterministic (within
rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _segsum_kernel(logp_ptr, ref_ptr, seg_ptr, ratio_ptr, T, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    seg = tl.load(seg_ptr + offs, mask=mask, other=-1)
    d = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(ACC) - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(ACC)
    keep = mask & (seg >= 0)
    tl.atomic_add(ratio_ptr + tl.where(keep, seg, 0), d, mask=keep)


@triton.jit
def _loss_kernel(ratio_ptr, adv_ptr, loss_ptr, S, inv_beta, inv_norm, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    r = tl.load(ratio_ptr + offs, mask=mask, other=0.0)
    a = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = tl.where(mask, a * inv_beta - r, 0.0)
    tl.atomic_add(loss_ptr, tl.sum(0.5 * d * d, axis=0) * inv_norm)


@triton.jit
def _grad_kernel(gl_ptr, ratio_ptr, adv_ptr, seg_ptr, out_ptr, T, inv_beta, inv_norm,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    seg = tl.load(seg_ptr + offs, mask=mask, other=-1)
    keep = mask & (seg >= 0)
    idx = tl.where(keep, seg, 0)
    r = tl.load(ratio_ptr + idx, mask=keep, other=0.0)
    a = tl.load(adv_ptr + idx, mask=keep, other=0.0).to(ACC)
    g = tl.load(gl_ptr).to(ACC)
    grad = tl.where(keep, -g * (a * inv_beta - r) * inv_norm, 0.0)
    tl.store(out_ptr + offs, grad, mask=mask)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def dapo_loss_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor,
                  beta: float, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], log_ratio [S]) in fp32 (fp64 for fp64 logp); segment ids already validated."""
    acc_t, acc_tl = _acc(logp.dtype)
    T, S = logp.shape[0], advantages.shape[0]
    ratio = torch.zeros(S, dtype=acc_t, device=logp.device)
    loss = torch.zeros((), dtype=acc_t, device=logp.device)
    if T > 0:
        _segsum_kernel[(triton.cdiv(T, BLOCK),)](logp.contiguous(), ref_logp.contiguous(),
                                                 segment_ids.long().contiguous(), ratio, T, ACC=acc_tl, BLOCK=BLOCK)
    if S > 0:
        _loss_kernel[(triton.cdiv(S, BLOCK),)](ratio, advantages.contiguous(), loss, S, 1.0 / beta, 1.0 / normalizer,
                                               ACC=acc_tl, BLOCK=BLOCK)
    return loss, ratio


def dapo_loss_bwd(grad_loss: torch.Tensor, log_ratio: torch.Tensor, segment_ids: torch.Tensor,
                  advantages: torch.Tensor, beta: float, normalizer: float) -> torch.Tensor:
    """dL/dlogp [T] in log_ratio's dtype."""
    acc_t, acc_tl = _acc(log_ratio.dtype)
    T = segment_ids.shape[0]
    out = torch.empty(T, dtype=acc_t, device=log_ratio.device)
    if T > 0:
        _grad_kernel[(triton.cdiv(T, BLOCK),)](grad_loss.reshape(1).contiguous(), log_ratio.contiguous(),
                                               advantages.contiguous(), segment_ids.long().contiguous(), out, T,
                                               1.0 / beta, 1.0 / normalizer, ACC=acc_tl, BLOCK=BLOCK)
    return out


def _compile_specs():
    from dapo_kernels.compile_check import KernelSpec, triton_type

    one = lambda dt, cc=None: [{"BLOCK": BLOCK, "num_warps": 4, "num_stages": 3}]  # noqa: E731
    acc = lambda dt: {"ACC": tl.float32}  # noqa: E731
    return [
        KernelSpec("dapo_loss_segsum", _segsum_kernel,
                   lambda dt: {"logp_ptr": f"*{triton_type(dt)}", "ref_ptr": f"*{triton_type(dt)}", "seg_ptr": "*i64",
                               "ratio_ptr": "*fp32", "T": "i32"}, acc, one, one),
        KernelSpec("dapo_loss_loss", _loss_kernel,
                   lambda dt: {"ratio_ptr": "*fp32", "adv_ptr": f"*{triton_type(dt)}", "loss_ptr": "*fp32", "S": "i32",
                               "inv_beta": "fp32", "inv_norm": "fp32"}, acc, one, one),
        KernelSpec("dapo_loss_grad", _grad_kernel,
                   lambda dt: {"gl_ptr": "*fp32", "ratio_ptr": "*fp32", "adv_ptr": f"*{triton_type(dt)}",
                               "seg_ptr": "*i64", "out_ptr": "*fp32", "T": "i32", "inv_beta": "fp32",
                               "inv_norm": "fp32"}, acc, one, one),
    ]


COMPILE_SPECS = _compile_specs()
