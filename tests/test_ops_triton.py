"""Triton kernels (dapo_kernels) under TRITON_INTERPRET=1 on CPU tensors, against the float64
PyTorch reference.

TRITON_INTERPRET must be set before triton is imported, so the checks run in one subprocess
(this file executed as a script); each pytest test reports one check. Under the interpreter
bf16 operands are upcast to fp32 before tl.dot (its bf16 dot returns garbage), so the bf16
case checks loads/stores and the upcast path, not tensor-core numerics.
Tolerances as in test_ops_target_logprob.py: fp64 1e-9, fp32 2e-5, bf16 grads 2e-2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = ["fp64_ragged", "fp64_vocab_splits", "fp32", "bf16", "single_token", "ignore_and_all_ignored",
          "shard_contract", "main_grad_fp64", "bwd_token_chunks", "dapo_loss_fp64", "dapo_loss_masked_and_empty",
          "fused_loss_fp64_chunks", "fused_loss_fp32_bf16", "fused_loss_main_grad_and_tied", "logp_never_positive",
          "vocab_262144"]


def _run_checks() -> dict:
    import torch

    from dapo_mcore.ops import dapo_loss, fused_target_logprob
    from dapo_mcore.ops import reference as ref

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    def logprob_case(T, H, V, dtype, tol_f, tol_g, y=None, seed=0, **kw):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
        w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        if y is None:
            y = torch.randint(0, V, (T,), generator=g)
        up = torch.randn(T, generator=g, dtype=torch.float64)
        out = {}
        for name, fn, args in (("tri", fused_target_logprob, dict(impl="triton", **kw)),
                               ("ref", ref.naive_target_logprob, {})):
            dt = dtype if name == "tri" else torch.float64
            hh = h.to(dt).clone().requires_grad_()
            ww = w.to(dt).clone().requires_grad_()
            lp = fn(hh, ww, y, **args)
            (lp * up.to(lp.dtype)).sum().backward()
            out[name] = (lp.detach(), hh.grad, ww.grad)
        errs = [rel(a, b) for a, b in zip(out["tri"], out["ref"])]
        assert errs[0] < tol_f and errs[1] < tol_g and errs[2] < tol_g, errs
        assert out["tri"][1].dtype == dtype and out["tri"][2].dtype == dtype
        return out["tri"], errs

    def fp64_ragged():
        return logprob_case(37, 24, 301, torch.float64, 1e-9, 1e-9, block_t=16, block_v=32)[1]

    def fp64_vocab_splits():
        # T=10 fits one token block -> the forward splits V=600 over 3 programs (merged in torch).
        return logprob_case(10, 20, 600, torch.float64, 1e-9, 1e-9)[1]

    def fp32():
        return logprob_case(45, 40, 333, torch.float32, 2e-5, 2e-5, block_t=16, block_v=64)[1]

    def bf16():
        return logprob_case(45, 40, 333, torch.bfloat16, 2e-5, 2e-2, block_t=16, block_v=32)[1]

    def main_grad_fp64():
        # grad_weight added into a pre-filled weight.main_grad; param.grad stays None
        g = torch.Generator().manual_seed(5)
        h = torch.randn(37, 24, generator=g, dtype=torch.float64)
        p = torch.nn.Parameter(torch.randn(301, 24, generator=g, dtype=torch.float64) * 0.3)
        y = torch.randint(0, 301, (37,), generator=g)
        up = torch.randn(37, generator=g, dtype=torch.float64)
        prefill = torch.randn(301, 24, generator=g, dtype=torch.float64)
        p.main_grad = prefill.clone()
        (fused_target_logprob(h, p, y, impl="triton", block_t=16, block_v=32) * up).sum().backward()
        ww = p.detach().clone().requires_grad_()
        (ref.naive_target_logprob(h, ww, y) * up).sum().backward()
        assert p.grad is None
        err = rel(p.main_grad - prefill, ww.grad)
        assert err < 1e-9, err
        return [err]

    def single_token():
        return logprob_case(1, 16, 70, torch.float64, 1e-9, 1e-9)[1]

    def ignore_and_all_ignored():
        y = torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(1))
        y[[0, 5, 19]] = -100
        (lp, gh, _), errs = logprob_case(20, 16, 90, torch.float64, 1e-9, 1e-9, y=y)
        assert (lp[y < 0] == 0).all() and (gh[y < 0] == 0).all()
        h = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
        w = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
        lp = fused_target_logprob(h, w, torch.full((4,), -1), impl="triton")
        lp.sum().backward()
        assert (lp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()
        return errs

    def shard_contract():
        import dapo_kernels as be

        g = torch.Generator().manual_seed(2)
        h = torch.randn(29, 24, generator=g, dtype=torch.float64)
        w = torch.randn(301, 24, generator=g, dtype=torch.float64) * 0.3
        y = torch.randint(0, 301, (29,), generator=g)
        up = torch.randn(29, generator=g, dtype=torch.float64)
        shards = [(0, w[:150]), (150, w[150:])]
        parts = [be.target_logprob_fwd(h, ws, y, st, 16, 32) for st, ws in shards]
        m = torch.stack([p[0] for p in parts]).max(0).values
        lse = m + sum(p[1] * torch.exp(p[0] - m) for p in parts).log()
        e_f = rel(sum(p[2] for p in parts) - lse, ref.naive_target_logprob(h, w, y))
        grads = [be.target_logprob_bwd(h, ws, y, lse, up, st, 16, 32) for st, ws in shards]
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        (ref.naive_target_logprob(hh, ww, y) * up).sum().backward()
        e_h = rel(grads[0][0] + grads[1][0], hh.grad)
        e_w = rel(torch.cat([grads[0][1], grads[1][1]]), ww.grad)
        assert max(e_f, e_h, e_w) < 1e-9, (e_f, e_h, e_w)
        return [e_f, e_h, e_w]

    def bwd_token_chunks():
        # the backward in 16-token chunks (G buffer budget of 16 rows): T=37 -> chunks 16, 16, 5
        import dapo_kernels.target_logprob as tlp

        prev = tlp.BWD_CHUNK_BYTES
        tlp.BWD_CHUNK_BYTES = 16 * 301 * 8
        try:
            errs = logprob_case(37, 24, 301, torch.float64, 1e-9, 1e-9, block_t=16, block_v=32)[1]
            errs += logprob_case(37, 24, 301, torch.bfloat16, 2e-5, 2e-2, block_t=16, block_v=32)[1]
        finally:
            tlp.BWD_CHUNK_BYTES = prev
        return errs

    def fused_case(T, H, V, S, dtype, tol_f, tol_g, chunk_bytes=None, seed=0, scale=1.0, y=None, seg=None):
        from dapo_mcore.ops import fused_dapo_loss

        g = torch.Generator().manual_seed(seed)
        h = (torch.randn(T, H, generator=g, dtype=torch.float64) * scale).to(dtype)
        w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        y = torch.randint(0, V, (T,), generator=g) if y is None else y
        seg = torch.randint(-1, S, (T,), generator=g) if seg is None else seg
        rl = -torch.rand(T, generator=g, dtype=torch.float64) * 5
        adv = torch.randn(S, generator=g, dtype=torch.float64) * 0.05
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fused_dapo_loss(hh, ww, y, rl, seg, adv, 0.02, impl="triton", chunk_bytes=chunk_bytes)
        out.loss.backward()
        hr, wr = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
        loss, ratio, logp = ref.naive_dapo_loss(hr, wr, y, rl, seg, adv, 0.02, S)
        loss.backward()
        errs = [rel(out.loss.reshape(1), loss.detach().reshape(1)), rel(out.log_ratio, ratio.detach()),
                rel(out.logp, logp.detach()), rel(hh.grad, hr.grad), rel(ww.grad, wr.grad)]
        assert max(errs[:3]) < tol_f and max(errs[3:]) < tol_g, errs
        assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
        return out, errs

    def fused_loss_fp64_chunks():
        # one chunk, then chunks of ~12 tokens (whole actions), and a 30-token action longer than a chunk
        errs = fused_case(61, 24, 301, 7, torch.float64, 1e-9, 1e-9)[1]
        errs += fused_case(61, 24, 301, 7, torch.float64, 1e-9, 1e-9, chunk_bytes=4 * 301 * 12)[1]
        seg = torch.randint(-1, 5, (70,), generator=torch.Generator().manual_seed(3))
        seg[10:40] = 2
        errs += fused_case(70, 24, 301, 5, torch.float64, 1e-9, 1e-9, chunk_bytes=4 * 301 * 8, seg=seg)[1]
        return errs

    def fused_loss_fp32_bf16():
        # bf16: G written narrow in place over the fp32 logits (the barrier path)
        errs = fused_case(45, 40, 333, 5, torch.float32, 2e-5, 2e-5, chunk_bytes=4 * 333 * 16)[1]
        errs += fused_case(45, 40, 333, 5, torch.bfloat16, 1e-4, 2e-2, chunk_bytes=4 * 333 * 16)[1]
        return errs

    def fused_loss_main_grad_and_tied():
        """grad_weight into a pre-filled main_grad (Megatron DDP hook, zero_out_wgrad) for a weight that is
        also the embedding table: both gradients land in main_grad (per-token op and fused loss)."""
        from dapo_mcore.ops import fused_dapo_loss

        g = torch.Generator().manual_seed(5)
        T, H, V, S = 30, 16, 97, 4
        ids = torch.randint(0, V, (T,), generator=g)
        y = torch.randint(0, V, (T,), generator=g)
        seg = torch.randint(-1, S, (T,), generator=g)
        rl = -torch.rand(T, generator=g, dtype=torch.float64)
        adv = torch.randn(S, generator=g, dtype=torch.float64) * 0.05
        w0 = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
        mix = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.2
        errs = []
        for op in ("fused_dapo_loss", "fused_target_logprob"):
            def objective(weight, fused):
                hid = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix)
                if op == "fused_target_logprob":
                    lp = fused_target_logprob(hid, weight, y, impl="triton") if fused else ref.naive_target_logprob(
                        hid, weight, y)
                    return (lp * rl).sum()
                if fused:
                    return fused_dapo_loss(hid, weight, y, rl, seg, adv, 0.02, impl="triton").loss
                return ref.naive_dapo_loss(hid, weight, y, rl, seg, adv, 0.02, S)[0]

            wn = w0.clone().requires_grad_()
            objective(wn, False).backward()
            p = torch.nn.Parameter(w0.clone())
            prefill = torch.randn(V, H, generator=g, dtype=torch.float64)
            p.main_grad = prefill.clone()
            p.grad_added_to_main_grad = False
            p.zero_out_wgrad = True
            calls = []

            def hook(*_):  # megatron-core 0.16 DDP hook
                if p.grad is not None and (not p.grad_added_to_main_grad or p.zero_out_wgrad):
                    p.main_grad.add_(p.grad.data)
                calls.append(1)
                p.grad = None

            acc_node = p.expand_as(p).grad_fn.next_functions[0][0]
            acc_node.register_hook(hook)
            objective(p, True).backward()
            err = rel(p.main_grad - prefill, wn.grad)
            assert err < 1e-9 and calls == [1] and p.grad is None, (op, err, calls)
            errs.append(err)
        return errs

    def logp_never_positive():
        # logits ~1e4, targets = argmax for some rows: logp <= 0 and finite (verl #2656)
        from dapo_mcore.ops import fused_dapo_loss

        g = torch.Generator().manual_seed(9)
        errs = []
        for dtype in (torch.float32, torch.bfloat16):
            h = (torch.randn(40, 32, generator=g, dtype=torch.float64) * 3000).to(dtype)
            w = (torch.randn(200, 32, generator=g, dtype=torch.float64) * 0.3).to(dtype)
            y = torch.randint(0, 200, (40,), generator=g)
            y[:10] = (h.double() @ w.double().t())[:10].argmax(1)
            lp = fused_target_logprob(h, w, y, impl="triton")
            out = fused_dapo_loss(h, w, y, -torch.rand(40, dtype=torch.float64), torch.randint(0, 4, (40,)),
                                  torch.zeros(4, dtype=torch.float64), 0.02, impl="triton")
            for x in (lp, out.logp):
                assert torch.isfinite(x).all() and (x <= 0).all(), x.max()
            want = ref.naive_target_logprob(h.double(), w.double(), y)
            errs.append((lp.double() - want).abs().max().item() / want.abs().max().item())
            assert errs[-1] < 1e-3, errs
        return errs

    def vocab_262144():
        # Megatron-LM #2206 (wrong numerics above a 250k vocab): V = 262144, targets near the top
        import dapo_kernels.fused_dapo_loss as fdl
        import dapo_kernels.target_logprob as tlp

        saved = (dict(tlp.INTERPRET_META), fdl.INTERPRET_BLOCK)
        tlp.INTERPRET_META.update(BLOCK_V=4096)   # (the GEMMs grow their interpreter blocks themselves)
        fdl.INTERPRET_BLOCK = 8192
        try:
            V = 262144
            y = torch.tensor([V - 1, 250001, 3, 131072, 262000, 7])
            errs = fused_case(6, 16, V, 2, torch.float64, 1e-9, 1e-9, y=y, seg=torch.tensor([0, 0, 0, 1, 1, -1]))[1]
            errs += logprob_case(6, 16, V, torch.float64, 1e-9, 1e-9, y=y)[1]
        finally:
            tlp.INTERPRET_META.clear()
            tlp.INTERPRET_META.update(saved[0])
            fdl.INTERPRET_BLOCK = saved[1]
        return errs

    def loss_case(T, S, seg=None):
        g = torch.Generator().manual_seed(4)
        logp = -torch.rand(T, generator=g, dtype=torch.float64)
        ref_logp = -torch.rand(T, generator=g, dtype=torch.float64)
        if seg is None:
            seg = torch.randint(-1, S, (T,), generator=g)
        adv = torch.randn(S, generator=g, dtype=torch.float64) * 0.1
        res = {}
        for impl in ("triton", "reference"):
            x = [t.clone().requires_grad_() for t in (logp, ref_logp, adv)]
            out = dapo_loss(x[0], x[1], seg, x[2], 0.02, impl=impl)
            out.loss.backward()
            res[impl] = [out.loss.detach().reshape(1), out.log_ratio] + [t.grad for t in x]
        errs = [rel(a, b) if b.numel() and b.abs().max() > 0 else (a - b).abs().max().item() if a.numel() else 0.0
                for a, b in zip(res["triton"], res["reference"])]
        assert max(errs) < 1e-9, errs
        return errs

    def dapo_loss_fp64():
        return loss_case(3000, 37)

    def dapo_loss_masked_and_empty():
        import torch as t

        errs = loss_case(12, 3, seg=t.full((12,), -1))
        errs += loss_case(9, 1, seg=t.tensor([-1, 0, 0, 0, -1, -1, 0, 0, -1]))
        empty = dapo_loss(t.zeros(0), t.zeros(0), t.zeros(0, dtype=t.long), t.zeros(0), 0.1, impl="triton")
        assert empty.loss.item() == 0.0
        return errs

    results = {}
    for name in CHECKS:
        try:
            results[name] = {"ok": True, "errs": locals()[name]()}
        except Exception as e:  # reported per check by the pytest side
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return results


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKS)
def test_triton_interpreter(results, name):
    assert results[name]["ok"], results[name].get("error")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps(_run_checks()))
