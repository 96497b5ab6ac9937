"""The prepared device check of dapo-mcore: one run of <= 8 minutes on a lent H100/H200 (docs/gpu.md), or the
same code on this CPU with tiny shapes (``--dry-run``: Triton kernels under TRITON_INTERPRET=1; CI runs it).

Parts, each with a time budget and guarded (a failure or a timeout is recorded, the other parts still run):

- ``env``: GPU, versions, the two ceilings measured on the card (bf16 matmul rate, device copy bandwidth);
- ``kernels``: the Triton kernels compiled for the card (not interpreted) against a float64 reference:
  per-token log-prob forward + backward and the fused DAPO loss, bf16 and fp32, T=8192, V=152064 (TP=1) and a
  TP=8 vocab shard (V=19008 at vocab_start 3*19008: the backend contract the TP all-reduces rely on);
- ``timings``: fwd+bwd, bf16, median of CUDA-event timings, with peak memory: naive torch, the token-chunked
  method (1024 tokens, recompute), our per-token op, our fused DAPO loss, Liger's fused linear cross-entropy and
  Cut Cross-Entropy (when their wheels were carried), and the 6·T·H·V floor at torch.mm's measured rate;
- ``flex``: flex_attention with the shared-prefix block mask, forward and backward, against SDPA with the dense
  mask (eager as the model calls it, and torch.compile'd);
- ``megatron``: the megatron-core local-spec GPT (tied embeddings) with our ops, one training step on CUDA
  against the same step on CPU (same weights and batch; loss, every gradient, the updated parameters).

Writes ``OUT/gpu_check.json`` after every part (a killed run keeps what finished) and ends with ``RESULT``
lines (``gpu_*``; ``dryrun_*`` under --dry-run).

    bash scripts/gpu_check.sh            # on the device (installs the carried wheels first)
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("env", "kernels", "timings", "flex", "megatron")
# Seconds per part on the device (the whole run <= 8 min; compile + autotune of the Triton kernels included).
BUDGET = {"env": 20, "kernels": 160, "timings": 140, "flex": 60, "megatron": 70}
DRY_SCALE = 4.0   # --dry-run: the Triton interpreter and a shared CI CPU are slow


@dataclass(frozen=True)
class Shapes:
    T: int
    H: int
    V: int
    tp_shard: int          # the vocab shard's TP size
    flex_L: int
    flex_heads: tuple
    flex_d: int
    model: dict            # the tiny megatron model (ArchSpec fields)
    group_tokens: tuple    # (state length range, action length range, actions per state range) of the packed rows


REAL = Shapes(T=8192, H=3584, V=152064, tp_shard=8, flex_L=2048, flex_heads=(16, 4), flex_d=128,
              model=dict(vocab_size=4096, hidden_size=256, ffn_hidden_size=704, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=32),
              group_tokens=((150, 300), (20, 60), (4, 8)))
DRY = Shapes(T=96, H=32, V=1000, tp_shard=8, flex_L=96, flex_heads=(4, 2), flex_d=16,
             model=dict(vocab_size=512, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16),
             group_tokens=((10, 20), (3, 8), (2, 3)))


def _alias_kernels() -> None:
    """``import dapo_kernels`` from the source tree (pyproject maps kernels/ to that name; nothing is installed
    on the device)."""
    try:
        import dapo_kernels  # noqa: F401
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("dapo_kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dapo_kernels"] = mod
    spec.loader.exec_module(mod)


def project() -> SimpleNamespace:
    """The project modules this check uses, in one place. ``masks``: the shared-prefix flex_attention mask and
    core attention; ``batching``: action groups packed into shared-prefix rows."""
    from dapo_mcore import packing
    from dapo_mcore.models import attention as masks
    from dapo_mcore.models import gpt, hf_config
    from dapo_mcore.ops import dapo_loss, fused_dapo_loss, fused_target_logprob, reference
    from dapo_mcore.parallel import fast_paths, runtime
    from dapo_mcore.training import logprobs as batching

    return SimpleNamespace(packing=packing, batching=batching, gpt=gpt, hf_config=hf_config, dapo_loss=dapo_loss,
                           fused_dapo_loss=fused_dapo_loss, fused_target_logprob=fused_target_logprob,
                           reference=reference, masks=masks, runtime=runtime, paths=fast_paths.PORTABLE)


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise PartTimeout in this (main) thread after ``seconds`` (between Python operations)."""
    def on_alarm(*_):
        raise PartTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def rel(a, b) -> float:
    """max |a - b| / max |b| (the tests' measure)."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1).to(a.device)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


def rel_norm(a, b) -> float:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1).to(a.device)
    return float((a - b).norm() / b.norm().clamp_min(1e-300)) if b.numel() else 0.0


class Timer:
    def __init__(self, dev):
        import torch

        self.torch, self.cuda = torch, dev.type == "cuda"

    def __call__(self, fn, warmup: int = 1, reps: int = 3) -> float:
        """Median seconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU)."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------------- env
def part_env(ctx) -> dict:
    import torch
    import triton

    dev, out = ctx.dev, ctx.entry
    out.update({"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
                "dry_run": ctx.dry})
    timer = Timer(dev)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
        n = 8192
        a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        out["bf16_mm_tflops"] = 2 * n ** 3 / timer(lambda: a @ b, warmup=3, reps=10) / 1e12
        x = torch.empty(2 ** 30, dtype=torch.uint8, device=dev).random_()
        y = torch.empty_like(x)
        out["copy_gb_s"] = 2 * x.numel() / timer(lambda: y.copy_(x), warmup=2, reps=10) / 1e9
        del a, b, x, y
        torch.cuda.empty_cache()
    else:
        n = 256
        a = torch.randn(n, n)
        out.update(gpu=None, cpu_threads=torch.get_num_threads(),
                   fp32_mm_gflops=2 * n ** 3 / timer(lambda: a @ a, reps=5) / 1e9)
    return out


# ------------------------------------------------------------------------------------------------- kernels
def _ref_stats(h, W, y, vocab_start: int, chunk: int):
    """float64 per-token (max, sumexp, target logit) over the rows of W (a shard at vocab_start)."""
    import torch

    T = h.shape[0]
    m, s, tgt = (torch.empty(T, dtype=torch.float64, device=h.device) for _ in range(3))
    W64 = W.double()
    for i in range(0, T, chunk):
        z = h[i:i + chunk].double() @ W64.t()
        mm = z.max(1).values
        m[i:i + chunk], s[i:i + chunk] = mm, torch.exp(z - mm[:, None]).sum(1)
        col = y[i:i + chunk] - vocab_start
        inside = (col >= 0) & (col < W.shape[0])
        tgt[i:i + chunk] = torch.where(inside, z.gather(1, col.clamp(0, W.shape[0] - 1)[:, None]).squeeze(1), 0.0)
    return m, s, tgt


def _ref_grads(h, W, y, lse, coef, vocab_start: int, chunk: int):
    """float64 grad_hidden (of this shard) and grad_weight for G = coef * (onehot(y) - exp(z - lse))."""
    import torch

    T, H = h.shape
    gh = torch.empty(T, H, dtype=torch.float64, device=h.device)
    gw = torch.zeros(W.shape[0], H, dtype=torch.float64, device=h.device)
    W64 = W.double()
    for i in range(0, T, chunk):
        hc = h[i:i + chunk].double()
        z = hc @ W64.t()
        c = coef[i:i + chunk]
        G = -c[:, None] * torch.exp(z - lse[i:i + chunk, None])
        col = y[i:i + chunk] - vocab_start
        inside = (col >= 0) & (col < W.shape[0])
        G.scatter_add_(1, col.clamp(0, W.shape[0] - 1)[:, None], torch.where(inside, c, 0.0)[:, None])
        gh[i:i + chunk] = G @ W64
        gw += G.t() @ hc
    return gh, gw


def _inputs(ctx, seed: int = 0):
    import torch

    sh, dev = ctx.shapes, ctx.dev
    g = torch.Generator(device=dev).manual_seed(seed)
    h = torch.randn(sh.T, sh.H, device=dev, generator=g).bfloat16()
    W = (torch.randn(sh.V, sh.H, device=dev, generator=g) * (1.2 / math.sqrt(sh.H))).bfloat16()  # logits ~N(0, 1.4)
    y = torch.randint(0, sh.V, (sh.T,), device=dev, generator=g)
    seg = torch.arange(sh.T, device=dev) // 32
    seg = torch.where(seg % 5 == 4, torch.full_like(seg, -1), seg - seg // 5)  # every 5th block: state tokens
    S = int(seg.max()) + 1
    ref_logp = -3.0 * torch.rand(sh.T, device=dev, generator=g, dtype=torch.float64)
    adv = 0.05 * torch.randn(S, device=dev, generator=g, dtype=torch.float64)
    up = torch.randn(sh.T, device=dev, generator=g, dtype=torch.float64)
    return h, W, y, seg, ref_logp, adv, up


def part_kernels(ctx) -> dict:
    import torch

    import dapo_kernels as be

    P, sh, dev = project(), ctx.shapes, ctx.dev
    chunk = 1024 if not ctx.dry else 32
    beta = 0.02
    h, W, y, seg, ref_logp, adv, up = _inputs(ctx)
    S = adv.shape[0]
    tol = {"bfloat16": (1e-4, 2e-2), "float32": (1e-5, 1e-4)}
    out = ctx.entry
    checks = out.setdefault("checks", {})
    # float64 references (the inputs are bf16 values: one reference serves both dtypes)
    m, s, tgt = _ref_stats(h, W, y, 0, chunk)
    lse = m + torch.log(s)
    logp_ref = tgt - lse
    gh_tok, gw_tok = _ref_grads(h, W, y, lse, up, 0, chunk)
    keep = seg >= 0
    lp_a = torch.where(keep, logp_ref, 0.0)
    ratio = torch.zeros(S, dtype=torch.float64, device=dev).index_add_(0, seg[keep], (lp_a - ref_logp)[keep])
    loss_ref = 0.5 * ((adv / beta - ratio) ** 2).sum() / S
    coef = torch.where(keep, -(adv[seg.clamp_min(0)] / beta - ratio[seg.clamp_min(0)]) / S, 0.0)
    gh_loss, gw_loss = _ref_grads(h, W, y, lse, coef, 0, chunk)
    ctx.sync()
    out["reference_s"] = round(time.perf_counter() - ctx.part_t0, 1)
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        tf, tg = tol[name]
        hh = h.detach().to(dtype).clone().requires_grad_()
        ww = W.detach().to(dtype).clone().requires_grad_()
        t0 = time.perf_counter()
        lp = P.fused_target_logprob(hh, ww, y, impl="triton")
        (lp * up.to(lp.dtype)).sum().backward()
        ctx.sync()
        e = {"logp": rel(lp, logp_ref), "grad_hidden": rel(hh.grad, gh_tok), "grad_weight": rel(ww.grad, gw_tok),
             "grad_weight_norm": rel_norm(ww.grad, gw_tok), "logp_max": float(lp.max()),
             "first_call_s": round(time.perf_counter() - t0, 2)}
        e["ok"] = e["logp"] < tf and e["grad_hidden"] < tg and e["grad_weight"] < tg and e["logp_max"] <= 0
        checks[f"logprob_{name}_tp1"] = e
        hh.grad = ww.grad = None
        t0 = time.perf_counter()
        res = P.fused_dapo_loss(hh, ww, y, ref_logp, seg, adv, beta, impl="triton")
        res.loss.backward()
        ctx.sync()
        e = {"loss": rel(res.loss.reshape(1), loss_ref.reshape(1)), "log_ratio": rel(res.log_ratio, ratio),
             "logp": rel(res.logp[keep], logp_ref[keep]), "grad_hidden": rel(hh.grad, gh_loss),
             "grad_weight": rel(ww.grad, gw_loss), "grad_weight_norm": rel_norm(ww.grad, gw_loss),
             "first_call_s": round(time.perf_counter() - t0, 2)}
        e["ok"] = (max(e["loss"], e["log_ratio"], e["logp"]) < tf * 10 and e["grad_hidden"] < tg
                   and e["grad_weight"] < tg)
        checks[f"fused_loss_{name}_tp1"] = e
        del hh, ww, lp, res
        # one TP=8 vocab shard through the backend contract (what the TP all-reduces combine)
        vs = sh.V // sh.tp_shard
        v0 = 3 * vs
        Ws = W[v0:v0 + vs].to(dtype)
        hd = h.to(dtype)
        ms, ss, ts = _ref_stats(h, W[v0:v0 + vs], y, v0, chunk)
        km, ks, kt = be.target_logprob_fwd(hd, Ws, y, v0)
        gh_s, gw_s = _ref_grads(h, W[v0:v0 + vs], y, lse, up, v0, chunk)
        kgh, kgw = be.target_logprob_bwd(hd, Ws, y, lse.float(), up.float(), v0)
        e = {"shard_lse": rel(km + torch.log(ks), ms + torch.log(ss)), "shard_target": rel(kt, ts),
             "grad_hidden": rel(kgh, gh_s), "grad_weight": rel(kgw, gw_s)}
        e["ok"] = e["shard_lse"] < tf and e["shard_target"] < tf and e["grad_hidden"] < tg and e["grad_weight"] < tg
        checks[f"logprob_{name}_tp8_shard"] = e
        fm, fs, ft, z = be.fused_loss_logits(hd, Ws, y, v0)
        gh_ls, gw_ls = _ref_grads(h, W[v0:v0 + vs], y, lse, coef, v0, chunk)
        kgh = torch.empty(sh.T, sh.H, dtype=torch.float32, device=dev)
        kgw = torch.zeros(vs, sh.H, dtype=torch.float32, device=dev)
        be.fused_loss_grads(hd, Ws, y, lse.float(), coef.float(), z, v0, kgh, kgw)
        e = {"shard_lse": rel(fm + torch.log(fs), ms + torch.log(ss)), "shard_target": rel(ft, ts),
             "grad_hidden": rel(kgh, gh_ls), "grad_weight": rel(kgw, gw_ls)}
        e["ok"] = e["shard_lse"] < tf and e["shard_target"] < tf and e["grad_hidden"] < tg and e["grad_weight"] < tg
        checks[f"fused_loss_{name}_tp8_shard"] = e
        del z, kgh, kgw
        ctx.free()
    out["ok"] = all(c["ok"] for c in checks.values())
    for name in ("bfloat16", "float32"):
        errs = [v for k, c in checks.items() if name in k for kk, v in c.items()
                if kk in ("logp", "grad_hidden", "grad_weight", "loss", "log_ratio", "shard_lse", "shard_target")]
        ctx.result(f"kernels_max_rel_err_{name}", max(errs), "rel")
    ctx.result("kernels_checks_passed", sum(c["ok"] for c in checks.values()), f"of_{len(checks)}")
    return out


# ------------------------------------------------------------------------------------------------- timings
def part_timings(ctx) -> dict:
    import torch

    P, sh, dev = project(), ctx.shapes, ctx.dev
    timer = Timer(dev)
    reps = 3 if not ctx.dry else 1
    beta = 0.02
    out = ctx.entry
    for tp in (1, sh.tp_shard):
        V = sh.V // tp
        h, W, y, seg, ref_logp, adv, up = _inputs(ctx, seed=1)
        W = W[:V].contiguous()
        y = y % V
        h = h.requires_grad_()
        param = torch.nn.Parameter(W.clone())
        param.main_grad = torch.zeros(V, sh.H, dtype=torch.float32, device=dev)
        param.grad_added_to_main_grad = False

        def ddp_hook(*_):  # megatron-core 0.16 DDP grad-accumulator hook
            if param.grad is not None and not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad.data)
            param.grad = None

        acc_node = param.expand_as(param).grad_fn.next_functions[0][0]
        acc_node.register_hook(ddp_hook)
        upf = up.float()

        def step(loss_fn):
            def run():
                param.grad_added_to_main_grad = False
                loss_fn().backward()
                h.grad = None
            return run

        variants = {
            "logprob_naive": lambda: (P.reference.naive_target_logprob(h, param, y) * upf).sum(),
            "logprob_fused": lambda: (P.fused_target_logprob(h, param, y) * upf).sum(),
            "loss_naive": lambda: P.reference.naive_dapo_loss(h, param, y, ref_logp, seg, adv, beta, 1.0)[0],
            "loss_chunked": lambda: P.reference.dapo_loss_reference(
                P.reference.chunked_target_logprob(h, param, y, 1024), ref_logp, seg, adv, beta, 1.0)[0],
            "loss_fused": lambda: P.fused_dapo_loss(h, param, y, ref_logp, seg, adv, beta, normalizer=1.0).loss,
        }
        ext = _external_losses(dev)
        for k, fn in ext.items():
            variants[k] = (lambda f=fn: f(h, param, y))
        rows = {}
        out[f"tp{tp}"] = {"T": sh.T, "H": sh.H, "V": V, "rows": rows}
        for name, fn in variants.items():
            try:
                ctx.free()
                base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t = timer(step(fn), warmup=1, reps=reps)
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
                rows[name] = {"fwd_bwd_s": t, "peak_mib": peak}
            except Exception as e:  # noqa: BLE001 (an external op may not run on this stack: record, go on)
                rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        with torch.no_grad():
            hd = h.detach()
            t_mm = timer(lambda: torch.mm(hd, W.t()), warmup=2, reps=max(reps, 3))
        rows["gemm_floor"] = {"fwd_bwd_s": 3 * t_mm, "mm_tflops": 2 * sh.T * sh.H * V / t_mm / 1e12}
        r = rows
        tag = "" if tp == 1 else f"_tp{tp}_shard"
        if "fwd_bwd_s" in r["loss_fused"]:
            f = r["loss_fused"]["fwd_bwd_s"]
            for base_name, res_name in (("loss_naive", "fused_loss_fwd_bwd_speedup"),
                                        ("loss_chunked", "fused_loss_speedup_vs_chunked"),
                                        ("liger_flce", "fused_loss_speedup_vs_liger"),
                                        ("cce", "fused_loss_speedup_vs_cce")):
                if "fwd_bwd_s" in r.get(base_name, {}):
                    ctx.result(res_name + tag, r[base_name]["fwd_bwd_s"] / f, "x")
            ctx.result("fused_loss_gemm_floor_fraction" + tag, r["gemm_floor"]["fwd_bwd_s"] / f, "x")
            if dev.type == "cuda" and "peak_mib" in r["loss_naive"]:
                ctx.result("fused_loss_peak_mem_ratio" + tag, r["loss_fused"]["peak_mib"] / r["loss_naive"]["peak_mib"],
                           "x")
        if "fwd_bwd_s" in r["logprob_fused"] and "fwd_bwd_s" in r["logprob_naive"]:
            ctx.result("logprob_fwd_bwd_speedup" + tag, r["logprob_naive"]["fwd_bwd_s"] / r["logprob_fused"]["fwd_bwd_s"],
                       "x")
        del h, W, param, acc_node
        ctx.free()
    return out


def _external_losses(dev) -> dict:
    """Liger's fused linear cross-entropy and Cut Cross-Entropy (sum of token CE: the same 6·T·H·V logits work
    as our loss), if their packages are importable (carried wheels); GPU only."""
    if dev.type != "cuda":
        return {}
    out = {}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        out["liger_flce"] = lambda h, w, y: liger(w, h, y)
    except Exception:  # noqa: BLE001
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum")
    except Exception:  # noqa: BLE001
        pass
    return out


# ------------------------------------------------------------------------------------------------- flex
def _packed_rows(P, sh, L: int, gen):
    """Packed rows (states with their actions, the actor's shared-prefix layout) of about L tokens."""
    import torch

    (s_lo, s_hi), (a_lo, a_hi), (n_lo, n_hi) = sh.group_tokens
    rows = []
    for _ in range(2):
        rb = P.packing.RowBuilder()
        while True:
            s_len = int(torch.randint(s_lo, s_hi + 1, (1,), generator=gen))
            acts = [torch.randint(5, 100, (int(torch.randint(a_lo, a_hi + 1, (1,), generator=gen)),),
                                  generator=gen).tolist() for _ in range(int(torch.randint(n_lo, n_hi + 1, (1,),
                                                                                           generator=gen)))]
            if len(rb) + s_len + sum(map(len, acts)) > L:
                break
            rb.add_state(torch.randint(5, 100, (s_len,), generator=gen).tolist(), acts)
        rows.append(rb.build())
    return rows


def part_flex(ctx) -> dict:
    import torch
    import torch.nn.functional as F

    P, sh, dev = project(), ctx.shapes, ctx.dev
    gen = torch.Generator().manual_seed(0)
    rows = _packed_rows(P, sh, sh.flex_L, gen)
    L = max(len(r) for r in rows)
    doc, part = P.masks.doc_part_of(rows)
    dense = torch.stack([r.attention_mask(L) for r in rows]).to(dev)      # [b, L, L] True = masked
    hq, hkv = sh.flex_heads
    d = sh.flex_d
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(L, len(rows), n, d, generator=gen).to(dev, dtype) for n in (hq, hkv, hkv))
    bm = P.masks.shared_prefix_block_mask(doc.to(dev), part.to(dev))

    def dense_attn(q, k, v):
        qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        kt, vt = kt.repeat_interleave(hq // hkv, 1), vt.repeat_interleave(hq // hkv, 1)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=~dense[:, None])
        return o.permute(2, 0, 1, 3).reshape(L, len(rows), hq * d)

    out = ctx.entry
    out.update({"rows": len(rows), "L": L, "density": float((~dense).float().mean())})
    gout = torch.randn(L, len(rows), hq * d, generator=gen).to(dev, dtype)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref = dense_attn(*ref)
    o_ref.backward(gout.double())
    timer = Timer(dev)
    variants = {"flex_eager": lambda a, b, c: P.masks.flex_core_attention(a, b, c, bm), "dense_sdpa": dense_attn}
    if dev.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)

        def flex_compiled(a, b, c):
            qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (a, b, c))
            o = compiled(qt, kt, vt, block_mask=bm, enable_gqa=True)
            return o.permute(2, 0, 1, 3).reshape(L, len(rows), hq * d)

        variants["flex_compiled"] = flex_compiled
    for name, fn in variants.items():
        if dev.type != "cuda" and name.startswith("flex"):   # flex_attention has no CPU backward
            with torch.no_grad():
                o = fn(q, k, v)
            out[name] = {"out": rel(o, o_ref), "backward": "skipped: flex_attention has no CPU backward"}
            continue
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = fn(*x)
        o.backward(gout)
        e = {"out": rel(o.detach(), o_ref.detach())}
        e.update({f"grad_{n}": rel(t.grad, r.grad) for n, t, r in zip("qkv", x, ref)})

        def fwd_bwd():
            y = [t.detach().requires_grad_() for t in (q, k, v)]
            fn(*y).backward(gout)

        e["fwd_bwd_s"] = timer(fwd_bwd, warmup=1, reps=3 if not ctx.dry else 1)
        out[name] = e
    errs = [v for name in ("flex_eager", "flex_compiled") if name in out for kk, v in out[name].items()
            if kk == "out" or kk.startswith("grad_")]
    ctx.result("flex_max_rel_err", max(errs), "rel")
    if "fwd_bwd_s" in out.get("flex_compiled", {}) and "fwd_bwd_s" in out["dense_sdpa"]:
        ctx.result("flex_compiled_speedup_vs_dense", out["dense_sdpa"]["fwd_bwd_s"] / out["flex_compiled"]["fwd_bwd_s"],
                   "x")
    return out


# ------------------------------------------------------------------------------------------------- megatron
def megatron_worker(args) -> None:
    """One training step of the local-spec GPT with our ops on ``args.worker_device``; the CPU worker runs first
    and saves the initial weights and the batch, the CUDA worker loads them."""
    import torch

    _alias_kernels()
    P = project()
    sh = DRY if args.dry_run else REAL
    work = Path(args.workdir)
    dev = torch.device(args.worker_device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    P.runtime.initialize_parallel(P.runtime.ParallelConfig(seed=1234))
    try:
        m = sh.model
        arch = P.hf_config.ArchSpec(model_type="qwen2", max_position_embeddings=1024, rms_norm_eps=1e-6,
                                    rope_theta=10000.0, qkv_bias=True, tie_word_embeddings=True, **m)
        cfg = P.hf_config.transformer_config(arch, paths=P.paths, masked_softmax_fusion=False,
                                             bias_dropout_fusion=False)
        model = P.gpt.build_model(arch, cfg, paths=P.paths).to(dev)
        init = work / "init.pt"
        if init.exists():
            saved = torch.load(init, weights_only=False)
            missing, unexpected = model.load_state_dict(saved["state"], strict=False)
            if unexpected or any(not k.endswith("_extra_state") for k in missing):
                raise RuntimeError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
            groups = saved["groups"]
        else:
            gen = torch.Generator().manual_seed(3)
            groups = []
            (s_lo, s_hi), (a_lo, a_hi), (n_lo, n_hi) = sh.group_tokens
            for _ in range(3):
                n = int(torch.randint(n_lo, n_hi + 1, (1,), generator=gen))
                acts = [torch.randint(5, m["vocab_size"], (int(torch.randint(a_lo, a_hi + 1, (1,), generator=gen)),),
                                      generator=gen).tolist() for _ in range(n)]
                groups.append(P.batching.ActionGroup(
                    state=torch.randint(5, m["vocab_size"], (int(torch.randint(s_lo, s_hi + 1, (1,), generator=gen)),),
                                        generator=gen).tolist(),
                    actions=acts, advantages=(0.1 * torch.randn(n, generator=gen)).tolist(),
                    ref_logp=[(-3 * torch.rand(len(a), generator=gen)).tolist() for a in acts]))
            state = {k: v.cpu() for k, v in model.state_dict().items() if torch.is_tensor(v)}  # no _extra_state
            torch.save({"state": state, "groups": groups}, init)
        batch = P.batching.pack_action_groups(groups, token_budget=4096, pad_id=0, shared=True,
                                              rows_per_microbatch=8)[0]
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        beta = 0.02
        n_act = len(batch["action_keys"])
        hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden")
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["src"])
        w = model.output_weight()
        out = P.fused_dapo_loss(h, w, batch["tgt"], batch["ref_logp"], batch["seg"], batch["advantages"], beta,
                                normalizer=1.0, impl=args.impl)
        loss = out.loss / n_act
        loss.backward()
        with torch.no_grad():  # the per-token path on the same model (the op the actor uses today)
            lp = P.fused_target_logprob(h.detach(), w.detach(), batch["tgt"], impl=args.impl)
            per_token = P.dapo_loss(lp, batch["ref_logp"], batch["seg"], batch["advantages"], beta, normalizer=1.0,
                                    impl="reference").loss / n_act
        grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        opt.step()
        params = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
        torch.save({"loss": loss.item(), "per_token_loss": per_token.item(), "grads": grads, "params": params,
                    "tokens": int(batch["input_ids"].numel()), "actions": n_act, "impl": args.impl},
                   work / f"{dev.type}.pt")
    finally:
        P.runtime.destroy_parallel()


def part_megatron(ctx) -> dict:
    import torch

    work = ctx.out / "megatron_step"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*.pt"):
        f.unlink()
    sides = [("cpu", "cpp" if _cpp_built() else "reference", {"CUDA_VISIBLE_DEVICES": ""}),
             ("cuda", "triton", {})] if not ctx.dry else [("cpu", "cpp" if _cpp_built() else "reference", {}),
                                                          ("cpu", "triton", {"TRITON_INTERPRET": "1"})]
    results = {}
    for i, (device, impl, env) in enumerate(sides):
        name = "cpu" if i == 0 else "device"
        cmd = [sys.executable, __file__, "--megatron-worker", "--worker-device", device, "--impl", impl,
               "--workdir", str(work)] + (["--dry-run"] if ctx.dry else [])
        t0 = time.perf_counter()
        budget = max(10.0, ctx.remaining() - 2)
        proc = subprocess.run(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")},
                              capture_output=True, text=True, timeout=budget)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} worker failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
        f = work / f"{device}.pt"
        if i == 1 and ctx.dry:   # the dry run's two sides are both CPU: keep them apart
            f.rename(work / "device.pt")
            f = work / "device.pt"
        results[name] = torch.load(f, weights_only=False)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    a, b = results["cpu"], results["device"]
    grad_err = max(rel(b["grads"][n], g) for n, g in a["grads"].items())
    step_err = max(rel(b["params"][n] - p0, a["params"][n] - p0) for n, p0 in
                   ((n, torch.load(work / "init.pt", weights_only=False)["state"][n].double())
                    for n in a["params"] if n in torch.load(work / "init.pt", weights_only=False)["state"]))
    out = ctx.entry
    out.update({"cpu": {k: a[k] for k in ("loss", "per_token_loss", "tokens", "actions", "impl", "seconds")},
           "device": {k: b[k] for k in ("loss", "per_token_loss", "tokens", "actions", "impl", "seconds")},
           "loss_rel_diff": abs(a["loss"] - b["loss"]) / abs(a["loss"]),
           "per_token_vs_fused_rel_diff": abs(b["per_token_loss"] - b["loss"]) / abs(b["loss"]),
           "grad_max_rel_diff": grad_err, "update_max_rel_diff": step_err, "params_compared": len(a["grads"])})
    out["ok"] = out["loss_rel_diff"] < 1e-4 and grad_err < 1e-3 and step_err < 1e-2
    ctx.result("megatron_step_loss_rel_diff", out["loss_rel_diff"], "rel")
    ctx.result("megatron_step_grad_max_rel_diff", grad_err, "rel")
    ctx.result("megatron_step_update_max_rel_diff", step_err, "rel")
    return out


def _cpp_built() -> bool:
    from dapo_mcore import _C

    return _C.available()


# ------------------------------------------------------------------------------------------------- driver
class Context:
    def __init__(self, dry: bool, out: Path):
        import torch

        self.dry, self.out = dry, out
        self.shapes = DRY if dry else REAL
        self.dev = torch.device("cuda" if (torch.cuda.is_available() and not dry) else "cpu")
        self.results: dict = {}
        self.part_t0 = time.perf_counter()
        self.part_budget = 0.0
        self.entry: dict = {}   # the running part's record (kept when the part fails or times out)

    def result(self, name: str, value: float, unit: str) -> None:
        self.results[name] = (float(value), unit)

    def remaining(self) -> float:
        return self.part_budget - (time.perf_counter() - self.part_t0)

    def sync(self) -> None:
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted (CI)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "gpu_check")),
                    help="folder for gpu_check.json (default $OUT)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget-scale", type=float, default=None,
                    help=f"multiply every part's time budget (default 1; {DRY_SCALE:g} with --dry-run)")
    ap.add_argument("--megatron-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="reference", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_scale is None:
        args.budget_scale = DRY_SCALE if args.dry_run else 1.0
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
    sys.path.insert(0, str(ROOT))
    if args.megatron_worker:
        megatron_worker(args)
        return 0
    _alias_kernels()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.dry_run, args.out)
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(ctx.dev),
              "shapes": ctx.shapes.__dict__, "budget_s": {p: BUDGET[p] * args.budget_scale for p in parts},
              "parts": {}}
    path = args.out / "gpu_check.json"
    fns = {"env": part_env, "kernels": part_kernels, "timings": part_timings, "flex": part_flex,
           "megatron": part_megatron}
    t_all = time.perf_counter()
    for name in parts:
        ctx.part_t0, ctx.part_budget = time.perf_counter(), BUDGET[name] * args.budget_scale
        print(f"[gpu_check] {name} (budget {ctx.part_budget:.0f} s) ...", flush=True)
        ctx.entry = entry = {}
        try:
            with deadline(ctx.part_budget):
                fns[name](ctx)
            entry["ok"] = bool(entry.get("ok", True))
        except BaseException as e:  # noqa: BLE001 (one part's failure must not lose the others)
            if isinstance(e, KeyboardInterrupt):
                raise
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.perf_counter() - ctx.part_t0, 1)
        report["parts"][name] = entry
        report["results"] = {k: {"value": v, "unit": u} for k, (v, u) in ctx.results.items()}
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"[gpu_check] {name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']} s"
              + ("" if entry["ok"] else f" ({entry.get('error', 'checks failed')[:300]})"), flush=True)
        ctx.free()
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    path.write_text(json.dumps(report, indent=1, default=str))
    prefix = "dryrun" if args.dry_run else "gpu"
    ok = sum(p["ok"] for p in report["parts"].values())
    print(f"\n{path}\n")
    for k, (v, u) in ctx.results.items():
        print(f"RESULT {prefix}_{k} {v:.4g} {u}")
    print(f"RESULT {prefix}_check_parts_ok {ok} of_{len(parts)}")
    return 0 if ok == len(parts) else 1


if __name__ == "__main__":
    sys.exit(main())
