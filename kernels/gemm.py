"""A plain Triton GEMM with an fp32 accumulator, for the weight and hidden gradients of the fused ops.

``C[M, N] (=|+=) A[M, K] @ B[K, N]``; A and B in any strides (the weight gradient reads ``G^T`` as a
transposed view), C in the accumulation dtype (fp32; fp64 for fp64 inputs). With ``accumulate`` the
epilogue adds the tile into C once: each output tile belongs to one program, so adding into
Megatron's ``main_grad`` is deterministic and needs no atomics. Grouped program order (``GROUP_M``
rows of tiles share their B panel in L2). bf16/fp16 operands use tensor cores (wgmma / mma), fp32
operands ``input_precision="ieee"`` (no TF32).

Autotuned over the configurations of :data:`SELECT_DH` / :data:`SELECT_DW` for the input dtype and the device (see
:mod:`dapo_kernels.tuning`), keyed on N and the power-of-two buckets of M and K (the token count
changes every micro-batch; re-tuning per exact size would be wasteful). The accumulating variant is
tuned with ``restore_value`` on C, so benchmarking never changes ``main_grad``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dapo_kernels import tuning

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
GRID = {
    "bfloat16": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
                 (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (64, 64, 64, 4, 5)],
    "float32": [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3),
                (64, 64, 16, 4, 4), (32, 64, 32, 4, 3)],
}
_FP32 = [(64, 128, 32, 8, 3), (64, 64, 16, 4, 4)]
SELECT_DH = {   # grad_hidden = G @ W (K = V: long reduction, fresh C)
    ("bfloat16", 90): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
    ("bfloat16", 80): [(256, 128, 64, 8, 3), (128, 128, 64, 8, 4)],
    ("float32", 90): _FP32, ("float32", 80): _FP32,
}
SELECT_DW = {   # main_grad += G^T @ h (transposed A, C read in the epilogue: more registers)
    ("bfloat16", 90): [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    ("bfloat16", 80): [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    ("float32", 90): _FP32, ("float32", 80): _FP32,
}
GROUP_M = 8
INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                 M_BUCKET, K_BUCKET,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 ACCUMULATE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=cmask, other=0.0)
    tl.store(c_ptrs, acc, mask=cmask)


_gemm_tuned = triton.autotune(
    tuning.autotune_configs(BLOCKS, SELECT_DH), key=["N", "M_BUCKET", "K_BUCKET"],
    prune_configs_by={"early_config_prune": tuning.pruner(BLOCKS, SELECT_DH, "a_ptr")})(_gemm_kernel)
_gemm_acc_tuned = triton.autotune(
    tuning.autotune_configs(BLOCKS, SELECT_DW), key=["N", "M_BUCKET", "K_BUCKET"], restore_value=["c_ptr"],
    prune_configs_by={"early_config_prune": tuning.pruner(BLOCKS, SELECT_DW, "a_ptr")})(_gemm_kernel)


def flags(dtype: torch.dtype) -> dict:
    """ACC / UPCAST / PRECISION constexprs of an operand dtype (UPCAST: the interpreter's bf16 dot is wrong)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    upcast = INTERPRET and dtype in (torch.bfloat16, torch.float16)
    return {"ACC": acc, "UPCAST": upcast, "PRECISION": "ieee" if dtype in (torch.float32, torch.float64) else "tf32"}


def _interpret_meta(M: int, N: int, K: int) -> dict:
    """Interpreter blocks: small (many tiles: the masking and tiling paths run), grown for huge shapes so that
    no launch has more than ~64 programs or K steps (the interpreter costs ~0.1 s per program)."""
    meta = dict(INTERPRET_META)
    while triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]) > 64 and meta["BLOCK_M"] < 4096:
        meta["BLOCK_M"] *= 2
    while triton.cdiv(K, meta["BLOCK_K"]) > 64 and meta["BLOCK_K"] * max(meta["BLOCK_M"], meta["BLOCK_N"]) < 2 ** 19:
        meta["BLOCK_K"] *= 2
    return meta


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, meta: dict | None = None) -> None:
    """``c (+)= a @ b`` in place; a ``[M, K]``, b ``[K, N]`` of one dtype, any strides (b's rows may be
    strided, its columns must be unit-stride), c ``[M, N]`` fp32/fp64 with unit column stride.
    ``meta``: fixed launch config (block sizes, warps, stages); default: autotune (GPU) or small
    interpreter blocks."""
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or c.shape != (M, N) or b.stride(1) != 1 or c.stride(1) != 1 or a.dtype != b.dtype:
        raise ValueError(f"matmul: need a [M, K], b [K, N] (unit column stride, a's dtype), c [M, N]; got "
                         f"{tuple(a.shape)} {a.dtype}, {tuple(b.shape)} {b.dtype} strides {b.stride()}, "
                         f"{tuple(c.shape)} strides {c.stride()}")
    if M == 0 or N == 0:
        return
    if K == 0:
        if not accumulate:
            c.zero_()
        return
    args = (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), _bucket(M), _bucket(K))
    fl = dict(flags(a.dtype), GROUP_M=GROUP_M, ACCUMULATE=accumulate)
    if INTERPRET and (meta is None or meta is INTERPRET_META):
        meta = _interpret_meta(M, N, K)
    if meta is None:
        fn = _gemm_acc_tuned if accumulate else _gemm_tuned
        fn[lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)](*args, **fl)
    else:
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **fl, **meta)


# ---- compile specs (dapo_kernels.compile_check) ----
def _compile_specs():
    from dapo_kernels.compile_check import KernelSpec, triton_type

    def sig(transposed_a: bool):
        def f(dt):
            s = {"a_ptr": f"*{triton_type(dt)}", "b_ptr": f"*{triton_type(dt)}", "c_ptr": "*fp32", "M": "i32",
                 "N": "i32", "K": "i32", "stride_bk": "i32", "stride_cm": "i32", "M_BUCKET": "i32", "K_BUCKET": "i32"}
            s.update({"stride_ak": "i32"} if transposed_a else {"stride_am": "i32"})
            return s
        return f

    def consts(transposed_a: bool, accumulate: bool):
        def f(dt):
            unit = {"stride_am": 1} if transposed_a else {"stride_ak": 1}   # the JIT specialises unit strides
            return {**unit, "stride_bn": 1, "GROUP_M": GROUP_M, "ACCUMULATE": accumulate, "ACC": tl.float32,
                    "UPCAST": False, "PRECISION": "ieee" if dt == "float32" else "tf32"}
        return f

    grid = lambda dt: [tuning.as_dict(BLOCKS, c) for c in GRID[dt]]  # noqa: E731

    def sel(table):
        return lambda dt, cc: [tuning.as_dict(BLOCKS, c) for c in table[(dt, cc)]]

    aligned = ("N", "stride_am", "stride_ak", "stride_bk", "stride_cm", "M_BUCKET", "K_BUCKET")
    return [KernelSpec("gemm_grad_hidden (G @ W)", _gemm_kernel, sig(False), consts(False, False), grid,
                       sel(SELECT_DH), aligned=aligned),
            KernelSpec("gemm_grad_weight (main_grad += G^T @ h)", _gemm_kernel, sig(True), consts(True, True), grid,
                       sel(SELECT_DW), aligned=aligned)]


COMPILE_SPECS = _compile_specs()
