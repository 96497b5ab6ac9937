"""Triton kernels of the fused target log-prob (GPU path; Ampere/Hopper, bf16 in, fp32 accumulate).

Forward (``_fwd_kernel``): grid (token blocks, vocab splits). Each program walks its vocab split in
BLOCK_V chunks: logits tile [BLOCK_T, BLOCK_V] = sum over BLOCK_H slices of h @ W^T (tl.dot, fp32
accumulator), then an online max / sum-exp per token and the target logit; the splits' partial
(max, sum-exp, target) are merged in torch ([n_splits, T] floats, never [T, V]). With ``STORE_Z``
the fp32 logits tile is also written out (the fused DAPO-loss op keeps one token chunk's logits).

Backward, token chunk by token chunk (``BWD_CHUNK_BYTES`` of G per chunk), three launches per chunk
and no atomics (docs/kernels.md has the roofline argument):
1. ``_grad_logits_kernel``, grid (token blocks, vocab blocks): recompute the logits tile and write
   ``G = g * (onehot(y) - exp(z - lse))`` in the operand dtype (bf16 for tensor cores) to a
   ``[chunk, V]`` buffer;
2. ``grad_hidden[chunk] = G @ W`` (:func:`dapo_kernels.gemm.matmul`);
3. ``grad_weight += G^T @ h[chunk]``, straight into Megatron's fp32 ``main_grad`` when given: each
   output tile is owned by one program and added once per chunk (deterministic).

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) bf16/fp16 operands are upcast to fp32 before
``tl.dot``: the interpreter's bf16 dot returns garbage (shared/notes/kernels-on-cpu.md).
fp32 inputs use ``input_precision="ieee"`` (no TF32); fp64 inputs accumulate in fp64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dapo_kernels import gemm, tuning

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCKS = ("BLOCK_T", "BLOCK_V", "BLOCK_H")
# Every candidate (scripts/kernel_report.py compiles them all) and what the GPU path may select per
# kernel and target: no spills, within the target's shared memory (docs/kernels.md, compile table).
GRID = {
    "bfloat16": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                 (64, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4)],
    "float32": [(64, 64, 32, 4, 3), (32, 128, 32, 4, 3), (64, 128, 32, 8, 3), (64, 64, 16, 4, 4),
                (128, 64, 32, 8, 3)],
}
_BF16_FWD = [(128, 128, 64, 8, 3), (64, 256, 32, 8, 3)]
SELECT = {   # the per-token forward
    ("bfloat16", 90): _BF16_FWD, ("bfloat16", 80): _BF16_FWD,
    ("float32", 90): [(64, 128, 32, 8, 3), (64, 64, 16, 4, 4)], ("float32", 80): [(64, 128, 32, 8, 3), (64, 64, 16, 4, 4)],
}
SELECT_STORE_Z = {   # the same kernel storing the logits (fused DAPO loss): more live registers
    ("bfloat16", 90): [(128, 128, 32, 8, 4), (64, 64, 64, 4, 4)], ("bfloat16", 80): [(128, 128, 32, 8, 3), (64, 64, 64, 4, 4)],
    ("float32", 90): [(64, 128, 32, 8, 3), (64, 64, 16, 4, 4)], ("float32", 80): [(64, 128, 32, 8, 3), (64, 64, 16, 4, 4)],
}
SELECT_GRAD = {   # the backward's G kernel
    ("bfloat16", 90): _BF16_FWD, ("bfloat16", 80): _BF16_FWD,
    ("float32", 90): [(64, 128, 32, 8, 3), (32, 128, 32, 4, 3)], ("float32", 80): [(64, 128, 32, 8, 3), (32, 128, 32, 4, 3)],
}
SPLIT_ALIGN = 256          # vocab splits are multiples of every BLOCK_V above
BWD_CHUNK_BYTES = 1 << 30  # G buffer of one backward token chunk ([chunk, V] in the operand dtype)
INTERPRET_META = {"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 4, "num_stages": 2}


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=ACC)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + tl.arange(0, BLOCK_H)[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + tl.arange(0, BLOCK_H)[None, :]
    for h0 in range(0, H, BLOCK_H):
        kmask = (h0 + tl.arange(0, BLOCK_H)) < H
        a = tl.load(h_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, max_ptr, sum_ptr, tgt_ptr, z_ptr, T, V, H, vocab_start, v_per_split,
                stride_h, stride_w, stride_z,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, STORE_Z: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    col_y = tl.load(y_ptr + rows, mask=rmask, other=-1) - vocab_start
    m = tl.full([BLOCK_T], float("-inf"), dtype=ACC)
    s = tl.zeros([BLOCK_T], dtype=ACC)
    tgt = tl.zeros([BLOCK_T], dtype=ACC)
    v_begin = pid_s * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                         BLOCK_T, BLOCK_V, BLOCK_H, ACC, UPCAST, PRECISION)
        if STORE_Z:
            tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], z,
                     mask=rmask[:, None] & cmask[None, :])
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        hit = (cols[None, :] == col_y[:, None]) & cmask[None, :]
        tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    out = pid_s * T + rows
    tl.store(max_ptr + out, m, mask=rmask)
    tl.store(sum_ptr + out, s, mask=rmask)
    tl.store(tgt_ptr + out, tgt, mask=rmask)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, out_ptr, T, V, H, vocab_start,
                        stride_h, stride_w, stride_o,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < T
    cmask = cols < V
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC)
    g = tl.where(y >= 0, g, 0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_H, ACC, UPCAST, PRECISION)
    hit = cols[None, :] == (y - vocab_start)[:, None]
    grad_z = tl.where(hit, g[:, None], 0.0) - g[:, None] * tl.exp(z - lse[:, None])
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :],
             grad_z.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])




def _tuned(fn, select: dict):
    return triton.autotune(tuning.autotune_configs(BLOCKS, select), key=["H", "V"],
                           prune_configs_by={"early_config_prune": tuning.pruner(BLOCKS, select, "h_ptr")})(fn)


_fwd_tuned = _tuned(_fwd_kernel, SELECT)
_fwd_store_tuned = _tuned(_fwd_kernel, SELECT_STORE_Z)
_grad_logits_tuned = _tuned(_grad_logits_kernel, SELECT_GRAD)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flags(dtype: torch.dtype) -> dict:
    return gemm.flags(dtype)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(f"target_logprob: hidden [T, H] and weight [V, H] of one dtype expected, got "
                         f"{tuple(hidden.shape)} {hidden.dtype}, {tuple(weight.shape)} {weight.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"target_logprob: targets must be [T={hidden.shape[0]}], got {tuple(targets.shape)}")


def _blocks(block_t: int | None, block_v: int | None, H: int) -> dict | None:
    """Explicit launch meta-parameters, or None to autotune (GPU only)."""
    if block_t is None and block_v is None and not INTERPRET:
        return None
    meta = dict(INTERPRET_META) if INTERPRET else tuning.as_dict(BLOCKS, SELECT_STORE_Z[("bfloat16", 90)][0])
    if block_t is not None:
        meta["BLOCK_T"] = block_t
    if block_v is not None:
        meta["BLOCK_V"] = block_v
    meta["BLOCK_H"] = min(meta["BLOCK_H"], max(16, triton.next_power_of_2(H)))
    for k in BLOCKS:
        if meta[k] < 16 or meta[k] & (meta[k] - 1):
            raise ValueError(f"target_logprob: {k}={meta[k]} must be a power of two >= 16 (tl.dot)")
    return meta


def _gemm_meta(meta: dict | None) -> dict | None:
    """GEMM launch config when the tile sizes are fixed (tests / interpreter), else None (autotune)."""
    if meta is None:
        return None
    return gemm.INTERPRET_META if INTERPRET else None


def logits_partials(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                    meta: dict | None, z: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sumexp, target logit) [T] of one shard; with ``z`` ([T, >= V] fp32, unit column stride) the
    logits are also stored there. Inputs contiguous, T > 0."""
    T, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    bt = meta["BLOCK_T"] if meta else 64
    programs = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 4
    n_split = max(1, min(triton.cdiv(V, SPLIT_ALIGN), programs // triton.cdiv(T, bt)))
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), SPLIT_ALIGN) * SPLIT_ALIGN
    n_split = triton.cdiv(V, v_per_split)
    mx = torch.empty(n_split, T, dtype=acc, device=hidden.device)
    sm, tg = torch.empty_like(mx), torch.empty_like(mx)
    y = targets.long().contiguous()
    zz = z if z is not None else mx
    args = (hidden, weight, y, mx, sm, tg, zz, T, V, H, vocab_start, v_per_split, hidden.stride(0), weight.stride(0),
            zz.stride(0) if z is not None else 0)
    fl = dict(_flags(hidden.dtype), STORE_Z=z is not None)
    if meta is None:
        tuned = _fwd_store_tuned if z is not None else _fwd_tuned
        tuned[lambda m: (triton.cdiv(T, m["BLOCK_T"]), n_split)](*args, **fl)
    else:
        _fwd_kernel[(triton.cdiv(T, meta["BLOCK_T"]), n_split)](*args, **fl, **meta)
    m = mx.max(dim=0).values
    s = (sm * torch.exp(mx - m[None, :])).sum(dim=0)
    return m, s, tg.sum(dim=0)


def target_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                       block_t: int | None = None, block_v: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max [T], sumexp [T] relative to max, target_logit [T]) over the shard, fp32 (fp64 for fp64)."""
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    if hidden.shape[0] == 0:
        e = hidden.new_zeros(0, dtype=acc_dtype(hidden.dtype))
        return e, e.clone(), e.clone()
    return logits_partials(hidden, weight, targets, vocab_start, _blocks(block_t, block_v, hidden.shape[1]))


def chunk_tokens(T: int, V: int, elem_bytes: int, budget: int) -> int:
    """Tokens per backward chunk: a ``[chunk, V]`` buffer within ``budget`` bytes, a multiple of 256
    (of 16 under the interpreter), at least one block, at most T."""
    align = 16 if INTERPRET else 256
    per_token = max(V, 1) * elem_bytes
    return max(align, min(T, budget // per_token) // align * align) if T > align else max(T, 1)


def padded(n: int) -> int:
    """Row stride (elements) of a [rows, n] buffer: a multiple of 16 (aligned rows for vector loads)."""
    return triton.cdiv(n, 16) * 16


def target_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logp: torch.Tensor, vocab_start: int, block_t: int | None = None,
                       block_v: int | None = None, main_grad: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_hidden [T, H] of this shard, grad_weight [V_local, H]) in the input dtype.

    With ``main_grad`` (``[V_local, H]`` contiguous, the accumulation dtype: Megatron's fp32 grad buffer)
    the weight-gradient GEMM adds straight into it and None is returned in its place: no ``[V_local, H]``
    buffer is allocated. Memory beyond the gradients: one ``[chunk, V_local]`` G buffer
    (``BWD_CHUNK_BYTES``).
    """
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    T, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    if main_grad is not None and (main_grad.shape != (V, H) or main_grad.dtype != acc or not main_grad.is_contiguous()):
        raise ValueError(f"target_logprob_bwd: main_grad must be a contiguous {acc} [{V}, {H}] tensor, got "
                         f"{main_grad.dtype} {tuple(main_grad.shape)}")
    gh = torch.empty(T, H, dtype=acc, device=hidden.device)
    gw = main_grad if main_grad is not None else torch.zeros(V, H, dtype=acc, device=hidden.device)
    if T > 0:
        meta = _blocks(block_t, block_v, H)
        gmeta = _gemm_meta(meta)
        y = targets.long().contiguous()
        lse, g = lse.to(acc).contiguous(), grad_logp.to(acc).contiguous()
        op_dtype = hidden.dtype  # G in the operand dtype: bf16 tiles for tensor cores, fp32 stays fp32
        tc = chunk_tokens(T, V, hidden.element_size(), BWD_CHUNK_BYTES)
        G = torch.empty(tc, padded(V), dtype=op_dtype, device=hidden.device)
        fl = _flags(hidden.dtype)
        for t0 in range(0, T, tc):
            n = min(tc, T - t0)
            hc = hidden[t0:t0 + n]
            args = (hc, weight, y[t0:t0 + n], lse[t0:t0 + n], g[t0:t0 + n], G, n, V, H, vocab_start,
                    hidden.stride(0), weight.stride(0), G.stride(0))
            if meta is None:
                _grad_logits_tuned[lambda m: (triton.cdiv(n, m["BLOCK_T"]), triton.cdiv(V, m["BLOCK_V"]))](*args, **fl)
            else:
                _grad_logits_kernel[(triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(V, meta["BLOCK_V"]))](
                    *args, **fl, **meta)
            Gc = G[:n, :V]
            gemm.matmul(Gc, weight, gh[t0:t0 + n], accumulate=False, meta=gmeta)
            gemm.matmul(Gc.t(), hc, gw, accumulate=True, meta=gmeta)
    if main_grad is not None:
        return gh.to(hidden.dtype), None
    return gh.to(hidden.dtype), gw.to(weight.dtype)


# ---- compile specs (dapo_kernels.compile_check): argument types of a launch, the configurations ----
def _sig(dtype: str, names: dict) -> dict:
    from dapo_kernels.compile_check import triton_type

    t = triton_type(dtype)
    return {k: v.replace("IN", t) for k, v in names.items()}


def _consts(dtype: str) -> dict:
    return {"ACC": tl.float32, "UPCAST": False, "PRECISION": "ieee" if dtype == "float32" else "tf32"}


_FWD_SIG = {"h_ptr": "*IN", "w_ptr": "*IN", "y_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
            "tgt_ptr": "*fp32", "z_ptr": "*fp32", "T": "i32", "V": "i32", "H": "i32", "vocab_start": "i32",
            "v_per_split": "i32", "stride_h": "i32", "stride_w": "i32", "stride_z": "i32"}
_GRAD_SIG = {"h_ptr": "*IN", "w_ptr": "*IN", "y_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32",
             "out_ptr": "*IN", "T": "i32", "V": "i32", "H": "i32", "vocab_start": "i32", "stride_h": "i32",
             "stride_w": "i32", "stride_o": "i32"}


def _compile_specs():
    from dapo_kernels.compile_check import KernelSpec

    grid = lambda dt: [tuning.as_dict(BLOCKS, c) for c in GRID[dt]]  # noqa: E731

    def sel(table):
        return lambda dt, cc: [tuning.as_dict(BLOCKS, c) for c in table[(dt, cc)]]

    aligned = ("H", "stride_h", "stride_w", "v_per_split", "stride_z", "stride_o")
    return [
        KernelSpec("target_logprob_fwd", _fwd_kernel, lambda dt: _sig(dt, _FWD_SIG),
                   lambda dt: {**_consts(dt), "STORE_Z": False}, grid, sel(SELECT), aligned=aligned),
        KernelSpec("fused_loss_logits (fwd + store z)", _fwd_kernel, lambda dt: _sig(dt, _FWD_SIG),
                   lambda dt: {**_consts(dt), "STORE_Z": True}, grid, sel(SELECT_STORE_Z), aligned=aligned),
        KernelSpec("target_logprob_grad_logits", _grad_logits_kernel, lambda dt: _sig(dt, _GRAD_SIG), _consts, grid,
                   sel(SELECT_GRAD), aligned=aligned),
    ]


COMPILE_SPECS = _compile_specs()
