"""Triton kernels of the fused target log-prob (GPU path; Ampere/Hopper, bf16 in, fp32 accumulate).

Forward: grid (token blocks, vocab splits). Each program walks its vocab split in BLOCK_V
chunks: logits tile [BLOCK_T, BLOCK_V] = sum over BLOCK_H slices of h @ W^T (tl.dot, fp32
accumulator), then an online max / sum-exp per token and the target logit; the splits' partial
(max, sum-exp, target) are merged in torch ([n_splits, T] floats, never [T, V]).
Backward: grid (token blocks, vocab blocks). Each program recomputes its logits tile, forms
G = g * (onehot(y) - softmax) with the saved global lse, and atomically adds G @ W_blk into
grad_hidden and G^T @ h_blk into grad_weight (fp32 buffers), H slice by H slice.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) bf16/fp16 operands are upcast to fp32
before ``tl.dot``: the interpreter's bf16 dot returns garbage (shared/notes/kernels-on-cpu.md).
fp32 inputs use ``input_precision="ieee"`` (no TF32); fp64 inputs accumulate in fp64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Defaults for Hopper/Ampere; block_t/block_v arguments override (tests use small ones).
DEFAULT = {"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
    for bt, bv, bh, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                             (128, 64, 64, 4, 4), (64, 256, 32, 8, 3)]
]
SPLIT_ALIGN = 256  # vocab splits are multiples of every BLOCK_V above


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        kmask = hk < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, max_ptr, sum_ptr, tgt_ptr, T, V, H, vocab_start, v_per_split,
                stride_h, stride_w,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
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
def _bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, gh_ptr, gw_ptr, T, V, H, vocab_start,
                stride_h, stride_w,
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
    grad_z = tl.where(rmask[:, None] & cmask[None, :], grad_z, 0.0)
    if not UPCAST:
        grad_z = grad_z.to(h_ptr.dtype.element_ty)  # tensor-core operand dtype (fp32 stays fp32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        kmask = hk < H
        wb = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        hb = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            wb = wb.to(ACC)
            hb = hb.to(ACC)
        dh = tl.dot(grad_z, wb, input_precision=PRECISION, out_dtype=ACC)
        tl.atomic_add(gh_ptr + rows[:, None] * H + hk[None, :], dh, mask=rmask[:, None] & kmask[None, :])
        dw = tl.dot(tl.trans(grad_z), hb, input_precision=PRECISION, out_dtype=ACC)
        tl.atomic_add(gw_ptr + cols[:, None] * H + hk[None, :], dw, mask=cmask[:, None] & kmask[None, :])


_fwd_tuned = triton.autotune(AUTOTUNE_CONFIGS, key=["H", "V"])(_fwd_kernel)
_bwd_tuned = triton.autotune(AUTOTUNE_CONFIGS, key=["H", "V"], reset_to_zero=["gh_ptr", "gw_ptr"])(_bwd_kernel)


def _flags(dtype: torch.dtype) -> dict:
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    upcast = INTERPRET and dtype in (torch.bfloat16, torch.float16)
    return {"ACC": acc, "UPCAST": upcast, "PRECISION": "ieee" if dtype in (torch.float32, torch.float64) else "tf32"}


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
    meta = dict(DEFAULT)
    if INTERPRET:
        meta.update(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16)
    if block_t is not None:
        meta["BLOCK_T"] = block_t
    if block_v is not None:
        meta["BLOCK_V"] = block_v
    meta["BLOCK_H"] = min(meta["BLOCK_H"], max(16, triton.next_power_of_2(H)))
    for k in ("BLOCK_T", "BLOCK_V", "BLOCK_H"):
        if meta[k] < 16 or meta[k] & (meta[k] - 1):
            raise ValueError(f"target_logprob: {k}={meta[k]} must be a power of two >= 16 (tl.dot)")
    return meta


def target_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                       block_t: int | None = None, block_v: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max [T], sumexp [T] relative to max, target_logit [T]) over the shard, fp32 (fp64 for fp64)."""
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    T, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if T == 0:
        e = hidden.new_zeros(0, dtype=acc)
        return e, e.clone(), e.clone()
    meta = _blocks(block_t, block_v, H)
    bt = meta["BLOCK_T"] if meta else 64
    if hidden.is_cuda:
        programs = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    else:
        programs = 4
    n_split = max(1, min(triton.cdiv(V, SPLIT_ALIGN), programs // triton.cdiv(T, bt)))
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), SPLIT_ALIGN) * SPLIT_ALIGN
    n_split = triton.cdiv(V, v_per_split)
    mx = torch.empty(n_split, T, dtype=acc, device=hidden.device)
    sm, tg = torch.empty_like(mx), torch.empty_like(mx)
    y = targets.long().contiguous()
    args = (hidden, weight, y, mx, sm, tg, T, V, H, vocab_start, v_per_split, hidden.stride(0), weight.stride(0))
    if meta is None:
        _fwd_tuned[lambda m: (triton.cdiv(T, m["BLOCK_T"]), n_split)](*args, **_flags(hidden.dtype))
    else:
        launch = dict(meta)
        _fwd_kernel[(triton.cdiv(T, launch["BLOCK_T"]), n_split)](*args, **_flags(hidden.dtype), **launch)
    m = mx.max(dim=0).values
    s = (sm * torch.exp(mx - m[None, :])).sum(dim=0)
    return m, s, tg.sum(dim=0)


_BWD_CONFIGS: dict = {}


def _tuned_bwd_config(args: tuple, dtype: torch.dtype) -> dict:
    """The autotuned backward launch config for this ``(H, V, dtype)`` (GPU): tuned once on scratch
    gradient buffers (the autotuner re-runs the kernel and zeroes its atomic targets), so that the real
    launch can accumulate into Megatron's ``main_grad`` exactly once."""
    hidden, weight = args[0], args[1]
    key = (hidden.shape[1], weight.shape[0], dtype)
    if key not in _BWD_CONFIGS:
        scratch = list(args)
        scratch[5], scratch[6] = torch.zeros_like(args[5]), torch.zeros_like(args[6])
        T, V = hidden.shape[0], weight.shape[0]
        _bwd_tuned[lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(V, m["BLOCK_V"]))](*scratch, **_flags(dtype))
        cfg = _bwd_tuned.best_config
        _BWD_CONFIGS[key] = cfg.all_kwargs()
    return _BWD_CONFIGS[key]


def target_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logp: torch.Tensor, vocab_start: int, block_t: int | None = None,
                       block_v: int | None = None, main_grad: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_hidden [T, H] of this shard, grad_weight [V_local, H]) in the input dtype.

    With ``main_grad`` (``[V_local, H]`` contiguous, the accumulation dtype: Megatron's fp32 grad buffer)
    the kernel's atomics add grad_weight straight into it and None is returned in its place: no
    ``[V_local, H]`` buffer is allocated (autotune needs one scratch buffer the first time a shape is
    tuned, see :func:`_tuned_bwd_config`).
    """
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    T, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if main_grad is not None and (main_grad.shape != (V, H) or main_grad.dtype != acc or not main_grad.is_contiguous()):
        raise ValueError(f"target_logprob_bwd: main_grad must be a contiguous {acc} [{V}, {H}] tensor, got "
                         f"{main_grad.dtype} {tuple(main_grad.shape)}")
    gh = torch.zeros(T, H, dtype=acc, device=hidden.device)
    if T == 0:
        return gh.to(hidden.dtype), None if main_grad is not None else torch.zeros_like(weight)
    gw = main_grad if main_grad is not None else torch.zeros(V, H, dtype=acc, device=hidden.device)
    meta = _blocks(block_t, block_v, H)
    args = (hidden, weight, targets.long().contiguous(), lse.to(acc).contiguous(), grad_logp.to(acc).contiguous(),
            gh, gw, T, V, H, vocab_start, hidden.stride(0), weight.stride(0))
    if meta is None and main_grad is None:
        _bwd_tuned[lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(V, m["BLOCK_V"]))](*args, **_flags(hidden.dtype))
    else:
        if meta is None:   # autotuning benchmarks by re-running the kernel: never on main_grad itself
            meta = _tuned_bwd_config(args, hidden.dtype)
        _bwd_kernel[(triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(V, meta["BLOCK_V"]))](
            *args, **_flags(hidden.dtype), **meta)
    if main_grad is not None:
        return gh.to(hidden.dtype), None
    return gh.to(hidden.dtype), gw.to(weight.dtype)


# ---- compile specs (dapo_kernels.compile_check): argument types of a launch, the autotune grid ----
def _cfg_dicts(configs) -> list:
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def _sig(dtype: str, names: dict) -> dict:
    from dapo_kernels.compile_check import triton_type

    t = triton_type(dtype)
    return {k: (v.replace("IN", t) if isinstance(v, str) else v) for k, v in names.items()}


def _consts(dtype: str) -> dict:
    return {"ACC": tl.float32, "UPCAST": False, "PRECISION": "ieee" if dtype == "float32" else "tf32"}


_FWD_SIG = {"h_ptr": "*IN", "w_ptr": "*IN", "y_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
            "tgt_ptr": "*fp32", "T": "i32", "V": "i32", "H": "i32", "vocab_start": "i32", "v_per_split": "i32",
            "stride_h": "i32", "stride_w": "i32"}
_BWD_SIG = {"h_ptr": "*IN", "w_ptr": "*IN", "y_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32", "gh_ptr": "*fp32",
            "gw_ptr": "*fp32", "T": "i32", "V": "i32", "H": "i32", "vocab_start": "i32", "stride_h": "i32",
            "stride_w": "i32"}


def _compile_specs():
    from dapo_kernels.compile_check import KernelSpec

    grid = lambda dt: _cfg_dicts(AUTOTUNE_CONFIGS)  # noqa: E731
    return [KernelSpec("target_logprob_fwd", _fwd_kernel, lambda dt: _sig(dt, _FWD_SIG), _consts, grid, grid,
                       aligned=("H", "stride_h", "stride_w", "v_per_split")),
            KernelSpec("target_logprob_bwd", _bwd_kernel, lambda dt: _sig(dt, _BWD_SIG), _consts, grid, grid,
                       aligned=("H", "stride_h", "stride_w"))]


COMPILE_SPECS = _compile_specs()
