"""fused_target_logprob (C++ CPU kernels and the reference backend) against the naive
log_softmax autograd path: forward and gradients of hidden and weight.

Tolerances (relative to the max |value| of the float64 reference on the same inputs):
float64 1e-9; float32 2e-5; bf16 inputs: logp 2e-5 (the logits are accumulated in fp32 from exact
bf16 values), gradients 2e-2 (they are returned in bf16: 2^-8 rounding).
"""
import pytest
import torch

from dapo_mcore import _C
from dapo_mcore.ops import fused_target_logprob
from dapo_mcore.ops import reference as ref
from dapo_mcore.ops.dispatch import resolve_impl

IMPLS = ["cpp", "reference"]
needs_cpp = pytest.mark.skipif(not _C.available(), reason="C++ ops not built")


def _inputs(T, H, V, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    up = torch.randn(T, generator=g, dtype=torch.float64)
    return h, w, y, up


def _run(fn, h, w, y, up, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp = fn(h, w, y, **kw)
    (lp * up.to(lp.dtype)).sum().backward()
    return lp.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check(impl, T, H, V, dtype, tol_fwd, tol_grad, block_t=8, block_v=64, scale=1.0, y_override=None):
    h, w, y, up = _inputs(T, H, V, dtype, scale=scale)
    if y_override is not None:
        y = y_override
    lp, gh, gw = _run(fused_target_logprob, h, w, y, up, impl=impl, block_t=block_t, block_v=block_v)
    rlp, rgh, rgw = _run(ref.naive_target_logprob, h.double(), w.double(), y, up)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gh.dtype == dtype and gw.dtype == dtype and gh.shape == h.shape and gw.shape == w.shape
    assert _rel(lp, rlp) < tol_fwd
    assert _rel(gh, rgh) < tol_grad
    assert _rel(gw, rgw) < tol_grad
    return lp, gh, gw


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,H,V", [(37, 24, 301), (64, 32, 256), (1, 16, 100), (5, 8, 3)])
def test_float64_matches_reference_to_1e9(impl, T, H, V):
    # ragged T (37, 5: not a multiple of block_t=8), V not a multiple of block_v=64, T=1, V < block.
    _check(impl, T, H, V, torch.float64, 1e-9, 1e-9)


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_and_bf16_tolerances(impl):
    _check(impl, 45, 40, 333, torch.float32, 2e-5, 2e-5)
    _check(impl, 45, 40, 333, torch.bfloat16, 2e-5, 2e-2)


@needs_cpp
def test_bf16_odd_hidden_uses_the_upcast_path():
    """H odd: the AVX512-BF16 kernel (K-pair packing) does not apply; the upcast + MKL path (the one CPUs
    without avx512_bf16 take) must meet the same tolerances."""
    _check("cpp", 45, 39, 333, torch.bfloat16, 2e-5, 2e-2)


@needs_cpp
def test_default_blocks_and_large_logits_are_stable():
    # |logits| ~ 1e3: an online log-sum-exp without max subtraction would overflow.
    _check("cpp", 130, 64, 1100, torch.float64, 1e-9, 1e-9, block_t=None, block_v=None, scale=300.0)
    lp, _, _ = _check("cpp", 130, 64, 1100, torch.float32, 2e-5, 2e-5, block_t=None, block_v=None, scale=300.0)
    assert torch.isfinite(lp).all()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_gives_zero_logp_and_no_gradient(impl):
    T, V = 20, 90
    _, _, y, _ = _inputs(T, 16, V, torch.float64)
    y = y.clone()
    y[[0, 7, 19]] = -100
    y[3] = -1
    lp, gh, _ = _check(impl, T, 16, V, torch.float64, 1e-9, 1e-9, y_override=y)
    mask = y < 0
    assert (lp[mask] == 0).all() and (gh[mask] == 0).all()
    assert (lp[~mask] < 0).all()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_ignored(impl):
    h, w, _, up = _inputs(6, 16, 50, torch.float64)
    y = torch.full((6,), -100)
    lp, gh, gw = _run(fused_target_logprob, h, w, y, up, impl=impl)
    assert lp.shape == (6,) and (lp == 0).all()
    assert (gh == 0).all() and (gw == 0).all()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_shards_merge_to_full_vocab(impl):
    """The backend contract that TP relies on: per-shard (max, sumexp, target) merged = full vocab."""
    from dapo_mcore.ops.dispatch import backend

    be = backend(impl)
    h, w, y, up = _inputs(29, 24, 301, torch.float64)
    shards = [(0, w[:150]), (150, w[150:])]
    parts = [be.target_logprob_fwd(h, ws, y, start, 8, 32) for start, ws in shards]
    m = torch.stack([p[0] for p in parts]).max(0).values
    s = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    tgt = sum(p[2] for p in parts)
    lse = m + s.log()
    full = ref.naive_target_logprob(h, w, y)
    assert _rel(tgt - lse, full) < 1e-12
    grads = [be.target_logprob_bwd(h, ws, y, lse, up, start, 8, 32) for start, ws in shards]
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    (ref.naive_target_logprob(hh, ww, y) * up).sum().backward()
    assert _rel(grads[0][0] + grads[1][0], hh.grad) < 1e-9
    assert _rel(torch.cat([grads[0][1], grads[1][1]]), ww.grad) < 1e-9


@needs_cpp
def test_cpp_matches_reference_backend_exactly_enough():
    h, w, y, up = _inputs(50, 32, 500, torch.float32)
    a = _run(fused_target_logprob, h, w, y, up, impl="cpp")
    b = _run(fused_target_logprob, h, w, y, up, impl="reference")
    for x, z in zip(a, b):
        assert _rel(x, z) < 1e-5


def test_bad_inputs_raise_clear_errors():
    h, w, y, _ = _inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        fused_target_logprob(h, w[:, :4], y, impl="reference")
    with pytest.raises(ValueError, match="targets"):
        fused_target_logprob(h, w, y[:3], impl="reference")
    with pytest.raises(ValueError, match="targets"):
        fused_target_logprob(h, w, y.float(), impl="reference")
    with pytest.raises(ValueError, match="differ"):
        fused_target_logprob(h, w.double(), y, impl="reference")
    with pytest.raises(ValueError, match="unknown ops impl"):
        fused_target_logprob(h, w, y, impl="cuda-magic")


@needs_cpp
def test_cpp_kernel_checks_its_inputs():
    ops = _C.load()
    h, w, y, _ = _inputs(4, 8, 10, torch.float32)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        ops.target_logprob_fwd(h, w, y.int(), 0, 8, 8)
    with pytest.raises(RuntimeError, match="block sizes"):
        ops.target_logprob_fwd(h, w, y, 0, 0, 8)


def test_impl_selection(monkeypatch):
    monkeypatch.setenv("DAPO_OPS_IMPL", "reference")
    assert resolve_impl(None, torch.device("cpu")) == "reference"
    monkeypatch.delenv("DAPO_OPS_IMPL")
    assert resolve_impl(None, torch.device("cpu")) == ("cpp" if _C.available() else "reference")
    assert resolve_impl("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_impl("cpp", torch.device("cuda"))


@needs_cpp
def test_cpp_threads_merge_partial_softmax_states():
    """2 threads take vocab chunks dynamically; their (max, sumexp) and grad_hidden partials merge."""
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _check("cpp", 70, 24, 1000, torch.float64, 1e-9, 1e-9, block_t=32, block_v=16)
        _check("cpp", 70, 24, 1000, torch.bfloat16, 2e-5, 2e-2, block_t=32, block_v=16)
    finally:
        torch.set_num_threads(prev)


def _main_grad_run(impl, T, H, V, dtype, megatron_flag, y=None, **kw):
    """Backward with weight.main_grad pre-filled: returns (param, prefill, h.grad, hook calls)."""
    h, w, y0, up = _inputs(T, H, V, dtype, seed=3)
    y = y0 if y is None else y
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    param = torch.nn.Parameter(w.clone())
    prefill = torch.randn(V, H, generator=torch.Generator().manual_seed(9), dtype=acc)
    param.main_grad = prefill.clone()
    calls = []
    if megatron_flag:
        param.grad_added_to_main_grad = False

        def hook(*_):  # megatron 0.16 DDP _make_backward_post_hook (overlap_grad_reduce off)
            if param.grad is not None and not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad.data)
            calls.append(param.grad is not None)
            param.grad = None

        grad_acc = param.expand_as(param).grad_fn.next_functions[0][0]  # kept alive, as DDP does
        grad_acc.register_hook(hook)
    hh = h.clone().requires_grad_()
    (fused_target_logprob(hh, param, y, impl=impl, **kw) * up.to(acc)).sum().backward()
    return param, prefill, hh.grad, calls


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("megatron_flag", [False, True])
def test_grad_weight_accumulates_into_main_grad(impl, dtype, tol, megatron_flag):
    # ragged T=37 (block_t 8), V=301 (block_v 64)
    T, H, V = 37, 24, 301
    param, prefill, gh, calls = _main_grad_run(impl, T, H, V, dtype, megatron_flag, block_t=8, block_v=64)
    h, w, y, up = _inputs(T, H, V, dtype, seed=3)
    _, rgh, rgw = _run(ref.naive_target_logprob, h.double(), w.double(), y, up)
    assert param.grad is None
    assert param.main_grad.dtype == prefill.dtype
    assert _rel(param.main_grad - prefill, rgw) < tol
    assert _rel(gh, rgh) < tol
    if megatron_flag:
        assert param.grad_added_to_main_grad is True
        assert calls == [True]  # the DDP hook ran (bucket bookkeeping) and discarded the dummy


@needs_cpp
@pytest.mark.parametrize("T,V", [(1, 100), (5, 3), (130, 1100)])
def test_main_grad_edge_shapes_default_blocks(T, V):
    # T=1, V < block, T and V not multiples of the default blocks (256, 512)
    param, prefill, _, _ = _main_grad_run("cpp", T, 16, V, torch.float64, True)
    h, w, y, up = _inputs(T, 16, V, torch.float64, seed=3)
    _, _, rgw = _run(ref.naive_target_logprob, h, w, y, up)
    assert _rel(param.main_grad - prefill, rgw) < 1e-9 and param.grad is None


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_main_grad_untouched_when_all_ignored_and_fallbacks(impl):
    param, prefill, gh, _ = _main_grad_run(impl, 6, 16, 50, torch.float64, True, y=torch.full((6,), -100))
    assert torch.equal(param.main_grad, prefill) and (gh == 0).all() and param.grad is None
    # opt-out: grad_weight is returned as usual, main_grad untouched
    h, w, y, up = _inputs(9, 16, 50, torch.float32)
    p = torch.nn.Parameter(w.clone())
    p.main_grad = torch.zeros(50, 16)
    (fused_target_logprob(h, p, y, impl=impl, accumulate_into_main_grad=False) * up.float()).sum().backward()
    assert p.grad is not None and (p.main_grad == 0).all()
    # a main_grad of another dtype (e.g. bf16 grad buffers) is not fused: grad returned
    p2 = torch.nn.Parameter(w.clone())
    p2.main_grad = torch.zeros(50, 16, dtype=torch.bfloat16)
    (fused_target_logprob(h, p2, y, impl=impl) * up.float()).sum().backward()
    assert _rel(p2.grad, p.grad) < 1e-6 and (p2.main_grad == 0).all()


@needs_cpp
def test_cpp_main_grad_checks():
    ops = _C.load()
    h, w, y, up = _inputs(4, 8, 10, torch.float32)
    lse = torch.zeros(4)
    with pytest.raises(RuntimeError, match="main_grad must be"):
        ops.target_logprob_bwd(h, w, y, lse, up.float(), 0, 8, 8, torch.zeros(10, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="main_grad must be"):
        ops.target_logprob_bwd(h, w, y, lse, up.float(), 0, 8, 8, torch.zeros(10, 7))
