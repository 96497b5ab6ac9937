"""dapo_loss (C++ and reference backends) against an explicit per-action formula, with gradients;
and the full chain fused_target_logprob -> dapo_loss against the naive path in float64."""
import pytest
import torch

from dapo_mcore import _C
from dapo_mcore.ops import dapo_loss, fused_target_logprob
from dapo_mcore.ops import reference as ref

IMPLS = ["cpp", "reference"]
needs_cpp = pytest.mark.skipif(not _C.available(), reason="C++ ops not built")


def _explicit(logp, ref_logp, seg, adv, beta, norm):
    """The paper's formula written out action by action (float64, python loops)."""
    total = 0.0
    ratios = []
    for s in range(adv.shape[0]):
        r = float((logp.double() - ref_logp.double())[seg == s].sum())
        ratios.append(r)
        total += 0.5 * (float(adv[s]) / beta - r) ** 2
    return total / norm, torch.tensor(ratios, dtype=torch.float64)


def _batch(T=40, S=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(T, generator=g, dtype=torch.float64).to(dtype)
    ref_logp = -torch.rand(T, generator=g, dtype=torch.float64).to(dtype)
    seg = torch.randint(-1, S, (T,), generator=g)  # unsorted, with masked (-1) tokens
    adv = (torch.randn(S, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    return logp, ref_logp, seg, adv


def _grads(impl, logp, ref_logp, seg, adv, beta, **kw):
    x = [t.detach().clone().requires_grad_() for t in (logp, ref_logp, adv)]
    out = dapo_loss(x[0], x[1], seg, x[2], beta, impl=impl, **kw)
    out.loss.backward()
    return out, [t.grad for t in x]


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalizer", [None, 17.0])
def test_matches_explicit_formula_and_autograd(impl, normalizer):
    logp, ref_logp, seg, adv = _batch()
    beta = 0.02
    out, grads = _grads(impl, logp, ref_logp, seg, adv, beta, normalizer=normalizer)
    want, ratios = _explicit(logp, ref_logp, seg, adv, beta, normalizer or adv.shape[0])
    assert abs(out.loss.item() - want) <= 1e-12 * abs(want)
    assert torch.allclose(out.log_ratio, ratios, rtol=1e-12, atol=1e-14)
    assert not out.log_ratio.requires_grad
    # gradients against autograd through the reference formula
    _, rgrads = _grads("reference", logp, ref_logp, seg, adv, beta, normalizer=normalizer)
    for a, b in zip(grads, rgrads):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-9
    assert (grads[0][seg < 0] == 0).all()  # masked tokens get no gradient
    assert torch.allclose(grads[1], -grads[0])


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_inputs(impl):
    logp, ref_logp, seg, adv = _batch(T=300, S=20, dtype=torch.float32)
    out, grads = _grads(impl, logp, ref_logp, seg, adv, 0.01)
    want, _ = _explicit(logp, ref_logp, seg, adv, 0.01, 20)
    assert out.loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert abs(out.loss.item() - want) <= 1e-5 * abs(want)


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_masked(impl):
    logp, ref_logp, _, adv = _batch(T=10, S=3)
    seg = torch.full((10,), -1)
    out, grads = _grads(impl, logp, ref_logp, seg, adv, 0.05)
    assert abs(out.loss.item() - float((0.5 * (adv / 0.05) ** 2).mean())) < 1e-12
    assert (out.log_ratio == 0).all() and (grads[0] == 0).all()


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_single_action_and_no_action(impl):
    logp, ref_logp, _, _ = _batch(T=7, S=1)
    seg = torch.tensor([-1, -1, 0, 0, 0, -1, -1])
    adv = torch.tensor([0.3], dtype=torch.float64)
    out, grads = _grads(impl, logp, ref_logp, seg, adv, 0.1)
    r = float((logp - ref_logp)[2:5].sum())
    assert abs(out.loss.item() - 0.5 * (3.0 - r) ** 2) < 1e-12
    assert torch.allclose(grads[0][2:5], torch.full((3,), -(3.0 - r), dtype=torch.float64))
    empty = dapo_loss(logp[:0], ref_logp[:0], seg[:0], adv[:0], 0.1, impl=impl)
    assert empty.loss.item() == 0.0 and empty.log_ratio.shape == (0,)


@needs_cpp
@pytest.mark.parametrize("impl", IMPLS)
def test_chain_with_fused_logprob_matches_naive_float64(impl):
    """Actor loss end to end: hidden, weight -> per-token logp -> DAPO loss, grads to 1e-9."""
    g = torch.Generator().manual_seed(3)
    T, H, V, S = 33, 16, 150, 4
    h = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (T,), generator=g)
    seg = torch.tensor([-1] * 5 + [0] * 7 + [1] * 6 + [-1] * 3 + [2] * 4 + [3] * 8)
    y[seg < 0] = -100  # state tokens: no log-prob needed
    ref_logp = -torch.rand(T, generator=g, dtype=torch.float64)
    adv = torch.randn(S, generator=g, dtype=torch.float64) * 0.05

    def run(logprob_fn, loss_impl, **kw):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = dapo_loss(logprob_fn(hh, ww, y, **kw), ref_logp, seg, adv, 0.02, impl=loss_impl)
        out.loss.backward()
        return out.loss.detach(), hh.grad, ww.grad

    got = run(fused_target_logprob, impl, impl=impl, block_t=8, block_v=32)
    want = run(ref.naive_target_logprob, "reference")
    for a, b in zip(got, want):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-9


def test_bad_segments_raise():
    logp, ref_logp, seg, adv = _batch(T=10, S=3)
    with pytest.raises(ValueError, match=r"segment_ids must lie in \[-1, S=3\)"):
        dapo_loss(logp, ref_logp, torch.full((10,), 3), adv, 0.1, impl="reference")
    with pytest.raises(ValueError, match="beta"):
        dapo_loss(logp, ref_logp, seg, adv, 0.0, impl="reference")
    with pytest.raises(ValueError, match=r"must all be \[T\]"):
        dapo_loss(logp, ref_logp[:5], seg, adv, 0.1, impl="reference")


@needs_cpp
def test_cpp_kernel_checks_segments():
    logp, ref_logp, _, adv = _batch(T=10, S=3)
    with pytest.raises(RuntimeError, match="segment_ids must lie"):
        _C.load().dapo_loss_fwd(logp, ref_logp, torch.full((10,), -2), adv, 0.1, 3.0)
