"""fused_dapo_loss (C++ and reference backends) against the unfused chain (naive log_softmax autograd +
the DAPO loss formula) and against today's path (fused_target_logprob -> dapo_loss): loss, per-action
log-ratios, per-token log-probs, grad_hidden and grad_weight.

Tolerances relative to the max |value| of the float64 reference: float64 1e-9; float32 2e-5; bf16 inputs:
loss / logp 1e-4 (fp32-exact logits from bf16 values), gradients 2e-2 (G rounded to bf16 for the GEMMs).
"""
import pytest
import torch

from dapo_mcore import _C
from dapo_mcore.ops import dapo_loss, fused_dapo_loss, fused_target_logprob
from dapo_mcore.ops import reference as ref
from dapo_mcore.ops.fused_dapo_loss import action_chunks

IMPLS = ["cpp", "reference"]
needs_cpp = pytest.mark.skipif(not _C.available(), reason="C++ ops not built")
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-4, 2e-2)}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _batch(T=61, H=24, V=301, S=7, dtype=torch.float64, seed=0, sorted_segments=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    seg = torch.randint(-1, S, (T,), generator=g)
    if sorted_segments:
        seg = seg.sort().values
    ref_logp = -torch.rand(T, generator=g, dtype=torch.float64) * 6
    adv = torch.randn(S, generator=g, dtype=torch.float64) * 0.05
    return h, w, y, ref_logp, seg, adv


def _naive(h, w, y, ref_logp, seg, adv, beta, norm):
    hh, ww = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    loss, ratio, logp = ref.naive_dapo_loss(hh, ww, y, ref_logp, seg, adv.double(), beta, norm)
    loss.backward()
    return loss.detach(), ratio.detach(), logp.detach(), hh.grad, ww.grad


def _fused(h, w, y, ref_logp, seg, adv, beta, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_dapo_loss(hh, ww, y, ref_logp, seg, adv, beta, **kw)
    out.loss.backward()
    return out.loss.detach(), out.log_ratio, out.logp, hh.grad, ww.grad


def _compare(got, want, dtype):
    tol_f, tol_g = TOL[dtype]
    names = ("loss", "log_ratio", "logp", "grad_hidden", "grad_weight")
    errs = {n: _rel(a.reshape(-1), b.reshape(-1)) for n, a, b in zip(names, got, want)}
    for n, e in errs.items():
        assert e < (tol_f if n in ("loss", "log_ratio", "logp") else tol_g), (n, errs)
    return errs


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 301 * 12])   # default (one chunk) / chunks of ~12 tokens
def test_matches_naive_chain(impl, dtype, chunk_bytes):
    h, w, y, ref_logp, seg, adv = _batch(dtype=dtype)
    beta = 0.02
    got = _fused(h, w, y, ref_logp, seg, adv, beta, impl=impl, chunk_bytes=chunk_bytes)
    want = _naive(h, w, y, ref_logp, seg, adv, beta, adv.shape[0])
    _compare(got, want, dtype)
    assert got[3].dtype == dtype and got[4].dtype == dtype
    assert (got[3][seg < 0] == 0).all() and (got[2][seg < 0] == 0).all()   # state tokens: nothing


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_equals_per_token_op_plus_dapo_loss(dtype):
    """The path the actor uses today (fused_target_logprob on the action tokens -> dapo_loss, normalizer 1)
    and the fused op on the same inputs: same loss, log-ratios and gradients."""
    h, w, y, ref_logp, seg, adv = _batch(T=90, S=9, dtype=dtype, seed=4, sorted_segments=True)
    beta = 0.015
    keep = seg >= 0
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = fused_target_logprob(hh[keep], ww, y[keep], impl="cpp")
    out = dapo_loss(lp, ref_logp[keep].to(lp.dtype), seg[keep], adv.to(lp.dtype), beta, normalizer=1.0, impl="cpp")
    out.loss.backward()
    today = (out.loss.detach(), out.log_ratio, torch.zeros(90, dtype=lp.dtype).masked_scatter(keep, lp.detach()),
             hh.grad, ww.grad)
    got = _fused(h, w, y, ref_logp, seg, adv, beta, impl="cpp", normalizer=1.0, chunk_bytes=4 * 301 * 20)
    errs = _compare(got, today, dtype)
    if dtype == torch.float64:
        assert max(errs.values()) < 1e-12


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_micro_batches_sum_to_the_global_mean(impl):
    """Per-token loss protocol (normalizer 1, count = actions): the sums of two micro-batches divided by the
    total count equal the mean over all actions of one batch, value and gradients."""
    h, w, y, ref_logp, seg, adv = _batch(T=80, S=8, seed=2, sorted_segments=True)
    beta = 0.02
    split = int((seg < 4).sum())    # micro-batch 1: actions 0-3 (+ the state tokens), 2: actions 4-7
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    parts = []
    for sl, s0 in ((slice(0, split), 0), (slice(split, 80), 4)):
        sg = seg[sl].clone()
        sg[sg >= 0] -= s0
        parts.append(fused_dapo_loss(hh[sl], ww, y[sl], ref_logp[sl], sg, adv[s0:s0 + 4], beta, normalizer=1.0,
                                     impl=impl))
    total = (parts[0].loss + parts[1].loss) / 8
    total.backward()
    one = _fused(h, w, y, ref_logp, seg, adv, beta, impl=impl)     # default normalizer S = 8
    assert _rel(total.detach().reshape(1), one[0].reshape(1)) < 1e-12
    assert _rel(hh.grad, one[3]) < 1e-12 and _rel(ww.grad, one[4]) < 1e-12


def test_action_chunks_whole_actions():
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3, 4])
    assert action_chunks(seg, 5) == [(0, 5), (5, 6), (6, 12), (12, 13)]   # action 3 (6 tokens) alone
    assert action_chunks(seg, 100) == [(0, 13)]
    assert action_chunks(seg, 1) == [(0, 3), (3, 5), (5, 6), (6, 12), (12, 13)]
    assert action_chunks(torch.zeros(0, dtype=torch.long), 4) == []


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_long_action_unsorted_segments_ignored_targets(impl):
    """An action longer than a chunk, segments in any order, targets < 0 inside an action (logp 0, no gradient,
    ref_logp still counts), an action with no tokens (½(A/β)²)."""
    h, w, y, ref_logp, seg, adv = _batch(T=70, S=6, seed=7)
    seg[10:45] = 2                   # a 35-token action; chunks of 8 tokens
    seg[seg == 5] = 1                # action 5 has no tokens
    y[[11, 30]] = -100
    beta = 0.02
    got = _fused(h, w, y, ref_logp, seg, adv, beta, impl=impl, chunk_bytes=4 * 301 * 8)
    want = _naive(h, w, y, ref_logp, seg, adv, beta, 6)
    _compare(got, want, torch.float64)
    assert (got[3][[11, 30]] == 0).all() and (got[2][[11, 30]] == 0).all()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_no_actions_still_gives_the_weight_a_gradient(impl, megatron_ddp_hook):
    h, w, y, ref_logp, _, adv = _batch(T=12)
    seg = torch.full((12,), -1)
    got = _fused(h, w, y, ref_logp, seg, adv, 0.02, impl=impl)
    assert abs(got[0].item() - 0.5 * float(((adv / 0.02) ** 2).sum()) / adv.shape[0]) < 1e-9
    assert (got[3] == 0).all() and got[4] is not None and (got[4] == 0).all()
    # S = 0, T = 0 (a DP-padding micro-batch): loss 0, and the DDP hook fires for the weight
    p = torch.nn.Parameter(w.clone())
    p.main_grad = torch.zeros_like(w)
    calls = megatron_ddp_hook(p)
    hh = torch.zeros(0, 24, dtype=torch.float64, requires_grad=True)
    out = fused_dapo_loss(hh, p, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                          torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), 0.02, impl=impl)
    (out.loss + hh.sum() * 0).backward()
    assert out.loss.item() == 0.0 and calls == [True] and (p.main_grad == 0).all()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_grad_weight_into_main_grad_with_megatron_ddp(impl, dtype, tol, megatron_ddp_hook):
    h, w, y, ref_logp, seg, adv = _batch(dtype=dtype, seed=3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = torch.nn.Parameter(w.clone())
    prefill = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=acc)
    p.main_grad = prefill.clone()
    calls = megatron_ddp_hook(p)
    hh = h.clone().requires_grad_()
    out = fused_dapo_loss(hh, p, y, ref_logp, seg, adv, 0.02, impl=impl, chunk_bytes=4 * 301 * 16)
    out.loss.backward()
    want = _naive(h, w, y, ref_logp, seg, adv, 0.02, adv.shape[0])
    assert p.grad is None and calls == [True] and p.grad_added_to_main_grad is True
    assert _rel(p.main_grad - prefill, want[4]) < tol and _rel(hh.grad, want[3]) < tol


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["fused_dapo_loss", "fused_target_logprob"])
def test_tied_embedding_weight_gets_both_gradients(impl, op, megatron_ddp_hook):
    """Output weight = the embedding table (tied, PP=1; megatron sets zero_out_wgrad): the embedding's own
    gradient and the op's must both land in main_grad (a torch.empty dummy would add garbage; verl #4174 is
    the same class of bug)."""
    T, H, V, S = 40, 16, 97, 5
    h0, w, y, ref_logp, seg, adv = _batch(T=T, H=H, V=V, S=S, seed=5)
    ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(6))
    mix = torch.randn(H, H, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 0.2

    def objective(weight, fused: bool):
        hid = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix) + h0 * 0.1
        if op == "fused_target_logprob":
            lp = (fused_target_logprob(hid, weight, y, impl=impl) if fused
                  else ref.naive_target_logprob(hid, weight, y))
            return (lp * ref_logp).sum()
        if fused:
            return fused_dapo_loss(hid, weight, y, ref_logp, seg, adv, 0.02, impl=impl).loss
        return ref.naive_dapo_loss(hid, weight, y, ref_logp, seg, adv, 0.02, S)[0]

    wn = w.clone().requires_grad_()
    objective(wn, False).backward()
    p = torch.nn.Parameter(w.clone())
    p.main_grad = torch.zeros_like(w)
    calls = megatron_ddp_hook(p, zero_out_wgrad=True)
    objective(p, True).backward()
    assert calls == [True] and torch.isfinite(p.main_grad).all()
    assert _rel(p.main_grad, wn.grad) < 1e-9
    # without megatron: plain autograd sums both paths into .grad
    p2 = torch.nn.Parameter(w.clone())
    objective(p2, True).backward()
    assert _rel(p2.grad, wn.grad) < 1e-9


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_log_probs_never_positive_with_huge_logits(impl):
    """verl #2656: fused log-probs above 0. Logits ~1e4 (fp32 and bf16): logp <= 0, finite, and equal to the
    float64 reference."""
    for dtype in (torch.float32, torch.bfloat16):
        h, w, y, ref_logp, seg, adv = _batch(T=50, dtype=dtype, seed=9, scale=3000.0)
        y[:10] = (h.double() @ w.double().t())[:10].argmax(1)    # targets = the argmax: logp -> 0 from below
        out = fused_dapo_loss(h, w, y, ref_logp, seg, adv, 0.02, impl=impl)
        lp = fused_target_logprob(h, w, y, impl=impl)
        for x in (out.logp, lp):
            assert torch.isfinite(x).all() and (x <= 0).all()
        want = ref.naive_target_logprob(h.double(), w.double(), y)
        assert (lp.double() - want).abs().max() <= 1e-3 * want.abs().max()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_above_250k(impl):
    """Megatron-LM #2206: wrong numerics above a 250k vocabulary. V = 262144 in float64 and bf16."""
    T, H, V = 6, 16, 262144
    for dtype in (torch.float64, torch.bfloat16):
        h, w, y, ref_logp, _, adv = _batch(T=T, H=H, V=V, S=2, dtype=dtype, seed=11)
        seg = torch.tensor([0, 0, 0, 1, 1, -1])
        y[0], y[1] = V - 1, 250001
        got = _fused(h, w, y, ref_logp, seg, adv, 0.02, impl=impl)
        want = _naive(h, w, y, ref_logp, seg, adv, 0.02, 2)
        _compare(got, want, dtype)
        lp = fused_target_logprob(h, w, y, impl=impl)
        assert _rel(lp, ref.naive_target_logprob(h.double(), w.double(), y)) < TOL[dtype][0]


@needs_cpp
def test_forward_without_grad_touches_nothing(megatron_ddp_hook):
    h, w, y, ref_logp, seg, adv = _batch()
    p = torch.nn.Parameter(w.clone())
    p.main_grad = torch.zeros_like(w)
    megatron_ddp_hook(p)
    with torch.no_grad():
        out = fused_dapo_loss(h, p, y, ref_logp, seg, adv, 0.02, impl="cpp")
    assert (p.main_grad == 0).all()
    assert _rel(out.loss.reshape(1), _naive(h, w, y, ref_logp, seg, adv, 0.02, 7)[0].reshape(1)) < 1e-9


@needs_cpp
def test_upstream_gradient_scaling(megatron_ddp_hook):
    """grad_hidden follows any upstream gradient; main_grad fusion needs the announced one (grad_scale)."""
    h, w, y, ref_logp, seg, adv = _batch()
    want = _naive(h, w, y, ref_logp, seg, adv, 0.02, 7)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    (3.0 * fused_dapo_loss(hh, ww, y, ref_logp, seg, adv, 0.02, impl="cpp").loss).backward()
    assert _rel(hh.grad, 3 * want[3]) < 1e-9 and _rel(ww.grad, 3 * want[4]) < 1e-9
    p = torch.nn.Parameter(w.clone())
    p.main_grad = torch.zeros_like(w)
    megatron_ddp_hook(p)
    hh = h.clone().requires_grad_()
    (4.0 * fused_dapo_loss(hh, p, y, ref_logp, seg, adv, 0.02, impl="cpp", grad_scale=4.0).loss).backward()
    assert _rel(p.main_grad, 4 * want[4]) < 1e-9 and _rel(hh.grad, 4 * want[3]) < 1e-9
    p.main_grad.zero_()
    p.grad_added_to_main_grad = False
    with pytest.raises(RuntimeError, match="grad_scale"):
        (2.0 * fused_dapo_loss(h, p, y, ref_logp, seg, adv, 0.02, impl="cpp").loss).backward()


def test_bad_inputs_raise_clear_errors():
    h, w, y, ref_logp, seg, adv = _batch(T=8, S=3)
    with pytest.raises(ValueError, match="hidden"):
        fused_dapo_loss(h, w[:, :4], y, ref_logp, seg, adv, 0.02, impl="reference")
    with pytest.raises(ValueError, match="segment_ids must be"):
        fused_dapo_loss(h, w, y, ref_logp, seg[:5], adv, 0.02, impl="reference")
    with pytest.raises(ValueError, match=r"lie in \[-1, S=3\)"):
        fused_dapo_loss(h, w, y, ref_logp, seg + 3, adv, 0.02, impl="reference")
    with pytest.raises(ValueError, match="beta"):
        fused_dapo_loss(h, w, y, ref_logp, seg, adv, 0.0, impl="reference")
    with pytest.raises(ValueError, match="int tensors"):
        fused_dapo_loss(h, w, y.float(), ref_logp, seg, adv, 0.02, impl="reference")
    with pytest.raises(ValueError, match="differ"):
        fused_dapo_loss(h, w.float(), y, ref_logp, seg, adv, 0.02, impl="reference")


@needs_cpp
def test_cpp_kernel_checks_its_inputs():
    ops = _C.load()
    h, w, y, *_ = _batch(T=4, H=8, V=10, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="z must be"):
        ops.fused_loss_logits(h, w, y, 0, 8, torch.empty(3))
    z = torch.empty(1000)
    ops.fused_loss_logits(h, w, y, 0, 8, z)
    with pytest.raises(RuntimeError, match="grad_weight must be"):
        ops.fused_loss_grads(h, w, y, torch.zeros(4), torch.zeros(4), z, 0, 8, None, torch.zeros(10, 8,
                                                                                              dtype=torch.float64))
    assert ops.bf16_gemm_engine() in ("amx", "avx512_bf16", "none")


@needs_cpp
@pytest.mark.parametrize("engine", ["panel", "avx512", "none"])
def test_bf16_gemm_engines_agree(engine, tmp_path):
    """The bf16 paths of both ops on the other engines (the blocked path on oneDNN brgemm panels, the
    AVX512-BF16 kernel, upcast + MKL) meet the same tolerances as the default (on AMX CPUs: the fused
    loss's flat path on MKL's bf16 GEMM); the engine is fixed at library load: a subprocess with
    DAPO_CPU_BF16_GEMM."""
    import os
    import subprocess
    import sys

    code = ("import torch, sys; sys.path.insert(0, 'tests'); import test_ops_fused_dapo_loss as t; "
            "from dapo_mcore.ops import cpp_backend as cb; print(cb.bf16_gemm_engine()); "
            "print(cb.fused_loss_bytes_per_token(torch.zeros(1, 24, dtype=torch.bfloat16), 301)); "
            "t.test_matches_naive_chain('cpp', torch.bfloat16, 4 * 301 * 12); "
            "t.test_matches_naive_chain('cpp', torch.bfloat16, None); "
            "import test_ops_target_logprob as u; u.test_float32_and_bf16_tolerances('cpp'); "
            "u.test_cpp_threads_merge_partial_softmax_states()")
    env = dict(os.environ, DAPO_CPU_BF16_GEMM=engine, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_engine, bytes_per_token = proc.stdout.split()[:2]
    assert got_engine in ({"panel": "amx", "avx512": "avx512_bf16", "none": "none"}[engine], "none")
    # Workspace per token at V = 301 (nb = ceil(301 / LOSS_BLOCK_V) vocab blocks of bv rows): the panel path
    # keeps exp(z - block max) in bf16 plus one fp32 max per block, nb * (bv / 2 + 1) * 4 bytes; the upcast
    # path fp32 logits, nb * bv * 4 (bv = 128: 780 and 1536).
    from dapo_mcore.ops.cpp_backend import LOSS_BLOCK_V as bv

    nb = -(-301 // bv)
    assert float(bytes_per_token) == (nb * (bv // 2 + 1) * 4.0 if got_engine != "none" else nb * bv * 4.0)

