"""Triton backend of the fused DAPO-loss op (:mod:`dapo_mcore.ops.fused_dapo_loss`), one token chunk
at a time (the chunking, the TP all-reduces and the loss arithmetic live in the op):

- :func:`fused_loss_logits`: the forward kernel of the target log-prob with ``STORE_Z``: partial
  (max, sum-exp, target logit) per token AND the chunk's fp32 logits ``z [chunk, V_local]``;
- :func:`fused_loss_grads`: ``_softmax_grad_kernel`` turns z into ``G = coef * (onehot(y) - exp(z - lse))``
  in place (bf16/fp16 G is written narrow into the first half of each fp32 row: one barrier per
  block orders each block's loads before the stores that overwrite them), then two GEMMs:
  ``grad_hidden = G @ W`` and ``grad_weight += G^T @ h`` (into Megatron's ``main_grad``).

So the logits are computed once (6·T·H·V FLOPs with the two gradient GEMMs) and the only
``[T, V]``-like memory is one chunk's z.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dapo_kernels import gemm, tuning
from dapo_kernels.target_logprob import INTERPRET, _blocks, _check, _gemm_meta, acc_dtype, logits_partials, padded

BLOCKS = ("BLOCK",)
GRID = {"bfloat16": [(1024, 4, 1), (2048, 8, 1), (4096, 8, 1)], "float32": [(1024, 4, 1), (2048, 8, 1)]}
SELECT = {("bfloat16", 90): [(2048, 8, 1)], ("bfloat16", 80): [(2048, 8, 1)],
          ("float32", 90): [(2048, 8, 1)], ("float32", 80): [(2048, 8, 1)]}
INTERPRET_BLOCK = 64


@triton.jit
def _softmax_grad_kernel(z_ptr, g_ptr, y_ptr, lse_ptr, coef_ptr, V, vocab_start, stride_z, stride_g,
                         BLOCK: tl.constexpr, NARROW: tl.constexpr):
    row = tl.program_id(0)
    col_y = tl.load(y_ptr + row) - vocab_start
    lse = tl.load(lse_ptr + row)
    c = tl.load(coef_ptr + row)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    g_row = g_ptr + row.to(tl.int64) * stride_g
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        m = cols < V
        z = tl.load(z_row + cols, mask=m, other=0.0)
        g = tl.where(cols == col_y, c, 0.0) - c * tl.exp(z - lse)
        if NARROW:
            # The narrow store of block j overwrites fp32 elements [j*BLOCK/2, (j+1)*BLOCK/2), loaded in
            # blocks <= j: all warps must have loaded block j before anyone stores it.
            tl.debug_barrier()
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=m)


def _workspace(T: int, V: int, acc: torch.dtype, device, workspace: torch.Tensor | None) -> torch.Tensor:
    ld = padded(V)
    if workspace is not None and workspace.dtype == acc and workspace.numel() >= T * ld and workspace.device == device:
        return workspace.view(-1)[:T * ld].view(T, ld)
    return torch.empty(T, ld, dtype=acc, device=device)


def fused_loss_bytes_per_token(hidden: torch.Tensor, V_local: int) -> float:
    """Bytes per token of the fp32 (fp64) logits workspace of :func:`fused_loss_logits` (row stride
    ``padded(V_local)``): the unit of the fused loss's chunk budget."""
    return padded(V_local) * acc_dtype(hidden.dtype).itemsize


def fused_loss_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                      workspace: torch.Tensor | None = None, block_t: int | None = None, block_v: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max [T], sumexp [T], target_logit [T]) of this shard (as ``target_logprob_fwd``) and the logits
    ``z`` ``[T, V_local]`` (fp32; fp64 for fp64 inputs) in a backend layout, for :func:`fused_loss_grads`.
    ``workspace``: a previous chunk's z, reused when large enough."""
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    T, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    z = _workspace(T, V, acc, hidden.device, workspace)
    if T == 0:
        e = hidden.new_zeros(0, dtype=acc)
        return e, e.clone(), e.clone(), z
    m, s, tgt = logits_partials(hidden, weight, targets, vocab_start, _blocks(block_t, block_v, H), z=z)
    return m, s, tgt, z


def fused_loss_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     coef: torch.Tensor, z: torch.Tensor, vocab_start: int, grad_hidden: torch.Tensor | None,
                     grad_weight: torch.Tensor | None, block_t: int | None = None, block_v: int | None = None) -> None:
    """From z of :func:`fused_loss_logits` (overwritten): ``G = coef * (onehot(y) - softmax)`` (rows with
    ``targets < 0``: coef must be 0), ``grad_hidden [T, H] = G @ W`` (written, accumulation dtype) and
    ``grad_weight [V_local, H] += G^T @ h`` (accumulation dtype, e.g. ``main_grad``); None: skipped."""
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    T, H = hidden.shape
    V = weight.shape[0]
    if T == 0:
        return
    acc = acc_dtype(hidden.dtype)
    narrow = hidden.dtype in (torch.bfloat16, torch.float16)
    G = z.view(hidden.dtype) if narrow else z          # same bytes: [T, 2*ld] narrow or [T, ld]
    meta = _blocks(block_t, block_v, H)
    block = INTERPRET_BLOCK if INTERPRET else SELECT[("bfloat16", 90)][0][0]
    warps = 4 if INTERPRET else SELECT[("bfloat16", 90)][0][1]
    _softmax_grad_kernel[(T,)](z, G, targets.long().contiguous(), lse.to(acc).contiguous(), coef.to(acc).contiguous(),
                               V, vocab_start, z.stride(0), G.stride(0), BLOCK=block, NARROW=narrow,
                               num_warps=warps)
    Gc = G[:, :V]
    gmeta = _gemm_meta(meta)
    if grad_hidden is not None:
        gemm.matmul(Gc, weight, grad_hidden, accumulate=False, meta=gmeta)
    if grad_weight is not None:
        gemm.matmul(Gc.t(), hidden, grad_weight, accumulate=True, meta=gmeta)


def _compile_specs():
    from dapo_kernels.compile_check import KernelSpec, triton_type

    def sig(dt):
        return {"z_ptr": "*fp32", "g_ptr": f"*{triton_type(dt)}", "y_ptr": "*i64", "lse_ptr": "*fp32",
                "coef_ptr": "*fp32", "V": "i32", "vocab_start": "i32", "stride_z": "i32", "stride_g": "i32"}

    grid = lambda dt: [tuning.as_dict(BLOCKS, c) for c in GRID[dt]]  # noqa: E731
    sel = lambda dt, cc: [tuning.as_dict(BLOCKS, c) for c in SELECT[(dt, cc)]]  # noqa: E731
    return [KernelSpec("fused_loss_softmax_grad (in place)", _softmax_grad_kernel, sig,
                       lambda dt: {"NARROW": dt != "float32"}, grid, sel, aligned=("stride_z", "stride_g"))]


COMPILE_SPECS = _compile_specs()
