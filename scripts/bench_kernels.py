"""Benchmark of the fused target log-prob op and the fused DAPO-loss op against the PyTorch paths.

Log-prob rows: naive ``logits = h @ W.T; log_softmax(logits.float()); gather`` (autograd, [T, V]) vs
:func:`dapo_mcore.ops.fused_target_logprob` (C++ on CPU, Triton on CUDA).

DAPO-loss rows (fwd+bwd of the actor's loss from hidden states, actions of ``ACTION_TOKENS`` tokens,
``normalizer=1`` as in the actor): ``loss_naive`` = naive log-probs + the loss formula by autograd;
``loss_chunked`` = the token-chunked PyTorch method NeMo-RL / NeMo-Automodel ship (chunks of 1024 tokens,
per-chunk ``logsumexp`` and gather under activation checkpointing: the backward recomputes each chunk's
logits) + the loss formula; ``loss_fused`` = :func:`dapo_mcore.ops.fused_dapo_loss` (logits once);
``floor`` = 3 x the time of ``torch.mm(h, W.T)`` measured in the same run: 6·T·H·V at torch.mm's rate, the
GEMM work of any method that computes the logits once (``cpu_fused_loss_gemm_floor_fraction`` = floor /
fused time, 1.0 = at the floor).

Each (variant, mode, dtype) runs in a fresh subprocess so the CPU peak memory is the process's
RSS high-water mark (``ru_maxrss``) minus the mark right after the inputs were allocated.

Weight gradient, two settings of fwd+bwd (column ``wgrad``):
- ``main_grad`` (the default, the fair comparison for Megatron training): the weight is a
  parameter with a persistent fp32 ``main_grad`` buffer [V, H] (Megatron DDP's grad buffer),
  allocated and touched BEFORE the baseline, and a grad-accumulator hook that does what
  Megatron 0.16's DDP hook does (``main_grad += grad`` unless ``grad_added_to_main_grad``, then
  ``grad = None``). naive: autograd materialises ``weight.grad`` and the hook adds it and frees
  it; fused: the kernel accumulates into ``main_grad`` directly (no [V, H] temporary).
- ``returned``: plain tensors; both variants return grad_weight in the input dtype (the memory
  of grad_hidden and grad_weight is then in both peaks; the last column gives the ratio of the
  memory beyond those outputs: fp32 grad_weight alone is 519 MiB at V=151936, H=896).
Time is the minimum over the repeats (after one warm-up run unless --quick) and over `rounds`
alternating processes; CPU-s (process CPU time, all threads) is printed too: on a shared,
loaded CPU it is a steadier measure of the work each variant does than wall time.

    python scripts/bench_kernels.py --quick     # CPU, T=512 (a few minutes on 2 cores)
    python scripts/bench_kernels.py             # CPU shape T=2048 H=896 V=151936 (Qwen2.5-0.5B), fp32+bf16
    python scripts/bench_kernels.py --dtype bfloat16 --mode fwd_bwd --wgrad main_grad   # one case
    python scripts/bench_kernels.py --what chunks --dtype bfloat16   # the fused loss per token chunk vs torch.mm
    python scripts/bench_kernels.py --what loss --dtype bfloat16 --chunk-mib 256   # another chunk budget
    python scripts/bench_kernels.py --what loss --dtype bfloat16 --block-v 256     # another CPU vocab block
On a CUDA machine it also runs the paper-scale shapes (T=8192, H=3584/8192, V=152064, TP=1/8:
TP=8 is simulated on one GPU by its local vocab shard). It always prints an H100 roofline.
Ends with ``RESULT <name> <value> <unit>`` lines.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

H100 = {"bf16_flops": 989e12, "hbm_bytes_per_s": 3.35e12, "name": "H100 SXM (dense bf16 989 TFLOP/s, 3.35 TB/s)"}


@dataclass
class Case:
    T: int
    H: int
    V: int
    dtype: str = "float32"
    device: str = "cpu"
    variant: str = "fused"   # fused | naive | loss_fused | loss_naive | loss_chunked | gemm_floor
    mode: str = "fwd_bwd"    # fwd | fwd_bwd
    wgrad: str = "main_grad"  # main_grad | returned (fwd_bwd only; see the module docstring)
    warmup: int = 1
    repeats: int = 2
    chunk_mib: int = 0        # loss_fused: the op's chunk_bytes in MiB (0: its default, CHUNK_BYTES)
    block_v: int = 0          # loss_fused on CPU: vocab rows per block of the C++ kernels (0: cpp_backend.LOSS_BLOCK_V)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


ACTION_TOKENS = 32   # tokens per action in the DAPO-loss rows
CHUNK_TOKENS = 1024  # tokens per chunk of the chunked baseline
BETA = 0.02


def run_case(c: Case) -> dict:
    """Run one case in this process; returns times (s) and peak memory (MiB). ``c.block_v`` (loss_fused on
    CPU) replaces the C++ backend's default vocab block for the duration of the case (the op has no block
    argument: its chunk budget and both kernels read ``cpp_backend.LOSS_BLOCK_V``)."""
    from dapo_mcore.ops import cpp_backend

    if c.block_v and not (c.variant == "loss_fused" and c.device == "cpu"):
        raise ValueError(f"block_v applies to the CPU loss_fused variant only, not {c.variant} on {c.device}")
    saved = cpp_backend.LOSS_BLOCK_V
    cpp_backend.LOSS_BLOCK_V = c.block_v or saved
    try:
        return _run_case(c)
    finally:
        cpp_backend.LOSS_BLOCK_V = saved


def _run_case(c: Case) -> dict:
    import torch

    from dapo_mcore.ops import fused_dapo_loss, fused_target_logprob
    from dapo_mcore.ops.reference import (chunked_target_logprob, dapo_loss_reference, naive_dapo_loss,
                                          naive_target_logprob)

    dev = torch.device(c.device)
    torch.manual_seed(0)
    # Filled in place: no transient copies that would raise the RSS high-water mark before the baseline.
    h = torch.empty(c.T, c.H, dtype=_dtype(c.dtype), device=dev).normal_(0.0, 0.5).requires_grad_()
    w = torch.empty(c.V, c.H, dtype=_dtype(c.dtype), device=dev).normal_(0.0, 0.05).requires_grad_()
    y = torch.randint(0, c.V, (c.T,), device=dev)
    g = torch.randn(c.T, device=dev)
    seg = torch.arange(c.T, device=dev) // ACTION_TOKENS
    ref_logp = -3.0 * torch.rand(c.T, device=dev)
    adv = 0.05 * torch.randn(int(seg[-1]) + 1 if c.T else 0, device=dev)

    def loss_fn(hh, ww, yy):  # the DAPO-loss variants
        if c.variant == "loss_fused":
            return fused_dapo_loss(hh, ww, yy, ref_logp, seg, adv, BETA, normalizer=1.0,
                                   chunk_bytes=(c.chunk_mib << 20) or None).loss
        if c.variant == "loss_naive":
            return naive_dapo_loss(hh, ww, yy, ref_logp, seg, adv, BETA, 1.0)[0]
        lp = chunked_target_logprob(hh, ww, yy, CHUNK_TOKENS)
        return dapo_loss_reference(lp, ref_logp, seg, adv, BETA, 1.0)[0]

    fn = fused_target_logprob if c.variant == "fused" else naive_target_logprob
    keep = []
    if c.mode == "fwd_bwd" and c.wgrad == "main_grad":
        w = torch.nn.Parameter(w.detach())
        w.main_grad = torch.zeros(c.V, c.H, dtype=torch.float32, device=dev)  # persistent, before the baseline
        w.grad_added_to_main_grad = False

        def ddp_hook(*_) -> None:  # megatron.core DDP _make_backward_post_hook (0.16.1)
            if w.grad is not None and not w.grad_added_to_main_grad:
                w.main_grad.add_(w.grad.data)
            w.grad = None

        keep.append(w.expand_as(w).grad_fn.next_functions[0][0])  # the grad accumulator, kept alive as DDP does
        keep[0].register_hook(ddp_hook)

    def step() -> None:
        if c.variant == "gemm_floor":
            with torch.no_grad():
                torch.mm(h, w.t())
        elif c.variant.startswith("loss_"):
            if hasattr(w, "grad_added_to_main_grad"):
                w.grad_added_to_main_grad = False
            loss_fn(h, w, y).backward()
            h.grad = None
            w.grad = None
        elif c.mode == "fwd":
            with torch.no_grad():
                fn(h, w, y)
        else:
            if hasattr(w, "grad_added_to_main_grad"):
                w.grad_added_to_main_grad = False  # DDP's zero_grad_buffer
            (fn(h, w, y) * g).sum().backward()
            h.grad = None
            w.grad = None

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for i in range(c.warmup + c.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        if i >= c.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    if dev.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"case": asdict(c), "time_s": min(times), "cpu_s": min(cpu), "peak_mib": peak_mib}


def spawn(c: Case) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(c))], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def roofline(T: int, H: int, V: int, tp: int, bytes_el: int = 2) -> dict:
    """H100 estimates of fwd+bwd (per TP rank, bf16 inputs).

    naive: 3 GEMMs plus separate memory-bound kernels over fp32 [T, V/tp] buffers (logits cast,
    log_softmax, gather backward, log_softmax backward: ~8 passes); unfused kernels run one after
    another, so time = GEMM time + pass time. per_token (the per-token op): 4 GEMMs (the backward
    recomputes the logits) with the softmax work in registers; its only HBM traffic is weights and
    activations, so time = max(FLOP time, byte time). fused_loss (the fused DAPO-loss op): 3 GEMMs; per
    token chunk of CHUNK_BYTES['cuda'] fp32 logits the z chunk is written, read and rewritten as bf16 G
    by the G pass, G is read by the two GEMMs, W is read twice and main_grad read + written once; the G
    pass is not overlapped with a GEMM, so time = max(FLOP time, GEMM-side bytes) + G-pass bytes
    (docs/kernels.md, "Roofline").
    """
    from dapo_mcore.ops.fused_dapo_loss import CHUNK_BYTES

    v = V // tp
    gemm = 2.0 * T * v * H
    w_bytes, h_bytes, l32 = v * H * bytes_el, T * H * bytes_el, T * v * 4
    naive_pass_bytes = 8 * l32
    naive_gemm_bytes = 4 * w_bytes + 3 * h_bytes
    fused_bytes = 5 * w_bytes + 3 * h_bytes  # W read in fwd, recompute, dgrad; grad W read+written
    naive_ms = 1e3 * (max(3 * gemm / H100["bf16_flops"], naive_gemm_bytes / H100["hbm_bytes_per_s"])
                      + naive_pass_bytes / H100["hbm_bytes_per_s"])
    fused_ms = 1e3 * max(4 * gemm / H100["bf16_flops"], fused_bytes / H100["hbm_bytes_per_s"])
    tc = max(1, CHUNK_BYTES["cuda"] // (4 * v))
    n_chunks = -(-T // tc)
    g_pass = T * v * (4 + 4)                      # the G pass: z read (fp32), G written in place
    loss_bytes = (T * v * 4 + g_pass + 2 * T * v * 2  # z written by the logits kernel; G read by both GEMMs
                  + n_chunks * (2 * w_bytes + 8 * v * H) + 3 * h_bytes)
    loss_ms = 1e3 * (max(3 * gemm / H100["bf16_flops"], (loss_bytes - g_pass) / H100["hbm_bytes_per_s"])
                     + g_pass / H100["hbm_bytes_per_s"])
    return {"naive": {"tflop": 3 * gemm / 1e12, "gbytes": (naive_pass_bytes + naive_gemm_bytes) / 1e9, "ms": naive_ms},
            "per_token": {"tflop": 4 * gemm / 1e12, "gbytes": fused_bytes / 1e9, "ms": fused_ms},
            "fused_loss": {"tflop": 3 * gemm / 1e12, "gbytes": loss_bytes / 1e9, "ms": loss_ms}}


def table(rows: list[dict]) -> str:
    lines = ["| shape (T, H, V) | dtype | mode | wgrad | naive time (s) | fused time (s) | speedup | naive CPU-s | fused CPU-s | "
             "CPU-s ratio | naive peak (MiB) | fused peak (MiB) | mem ratio | mem ratio beyond grad outputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']}, {r['H']}, {r['V']} | {r['dtype']} | {r['mode']} | {r['wgrad']} | {r['naive_s']:.3f} | "
                     f"{r['fused_s']:.3f} | {r['speedup']:.2f}x | {r['naive_cpu_s']:.2f} | {r['fused_cpu_s']:.2f} | "
                     f"{r['cpu_speedup']:.2f}x | {r['naive_mib']:.0f} | {r['fused_mib']:.0f} | "
                     f"{r['mem_ratio']:.3f} | {r['mem_ratio_excl_grads']:.3f} |")
    return "\n".join(lines)


def _excl_grads(row: dict) -> dict:
    """Peak memory beyond the gradient outputs both variants must return (fwd+bwd only):
    grad_hidden [T, H] and, with wgrad=returned, grad_weight [V, H], in the input dtype
    (with wgrad=main_grad the fp32 buffer is allocated before the baseline)."""
    if row["mode"] != "fwd_bwd":
        return {"grads_mib": 0.0, "mem_ratio_excl_grads": row["mem_ratio"]}
    el = 2 if row["dtype"] in ("bfloat16", "float16") else 4
    grads = ((row["V"] if row["wgrad"] == "returned" else 0) + row["T"]) * row["H"] * el / 2**20
    return {"grads_mib": grads, "mem_ratio_excl_grads": max(row["fused_mib"] - grads, 0.0)
            / max(row["naive_mib"] - grads, 1e-9)}


def compare(T: int, H: int, V: int, dtype: str, device: str, warmup: int, repeats: int, rounds: int,
            wgrads: tuple[str, ...] = ("main_grad",), modes: tuple[str, ...] = ("fwd", "fwd_bwd")) -> list[dict]:
    """naive vs fused; variants alternate over `rounds` fresh processes and the best run counts,
    so a burst of load from other jobs on a shared CPU does not land on one variant only."""
    rows = []
    runs = [(m, wg) for m in modes for wg in (wgrads if m == "fwd_bwd" else ("-",))]
    for mode, wgrad in runs:
        res: dict[str, list[dict]] = {"naive": [], "fused": []}
        for _ in range(rounds):
            for v in ("naive", "fused"):
                res[v].append(spawn(Case(T, H, V, dtype, device, v, mode, wgrad if wgrad != "-" else "main_grad",
                                         warmup, repeats)))
        best = {v: {"time_s": min(r["time_s"] for r in rs), "cpu_s": min(r["cpu_s"] for r in rs),
                    "peak_mib": max(r["peak_mib"] for r in rs)} for v, rs in res.items()}
        rows.append({"T": T, "H": H, "V": V, "dtype": dtype, "mode": mode, "wgrad": wgrad, "device": device,
                     "naive_s": best["naive"]["time_s"], "fused_s": best["fused"]["time_s"],
                     "naive_cpu_s": best["naive"]["cpu_s"], "fused_cpu_s": best["fused"]["cpu_s"],
                     "speedup": best["naive"]["time_s"] / best["fused"]["time_s"],
                     "cpu_speedup": best["naive"]["cpu_s"] / max(best["fused"]["cpu_s"], 1e-9),
                     "naive_mib": best["naive"]["peak_mib"], "fused_mib": best["fused"]["peak_mib"],
                     "mem_ratio": best["fused"]["peak_mib"] / max(best["naive"]["peak_mib"], 1e-9)})
        rows[-1].update(_excl_grads(rows[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def loss_table(rows: list[dict]) -> str:
    lines = ["| shape (T, H, V) | dtype | naive (s) | chunked (s) | fused (s) | 6THV floor (s) | fused vs naive | "
             "fused vs chunked | floor / fused | naive peak (MiB) | chunked peak (MiB) | fused peak (MiB) | "
             "fused / naive mem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']}, {r['H']}, {r['V']} | {r['dtype']} | {r['naive_s']:.3f} | {r['chunked_s']:.3f} | "
                     f"{r['fused_s']:.3f} | {r['floor_s']:.3f} | {r['speedup']:.2f}x | {r['vs_chunked']:.2f}x | "
                     f"{r['floor_fraction']:.2f} | {r['naive_mib']:.0f} | {r['chunked_mib']:.0f} | "
                     f"{r['fused_mib']:.0f} | {r['mem_ratio']:.3f} |")
    return "\n".join(lines)


def compare_loss(T: int, H: int, V: int, dtype: str, device: str, warmup: int, repeats: int, rounds: int,
                 chunk_mib: int = 0, block_v: int = 0) -> dict:
    """DAPO-loss fwd+bwd: naive / chunked / fused (weight gradient into a persistent fp32 main_grad, as under
    Megatron DDP; ``chunk_mib``: the fused op's chunk budget, 0 = its default; ``block_v``: its CPU vocab
    block, 0 = the backend's) and the GEMM floor, variants alternating over ``rounds`` fresh processes, best
    run each."""
    res: dict[str, list[dict]] = {v: [] for v in ("loss_naive", "loss_chunked", "loss_fused", "gemm_floor")}
    for _ in range(rounds):
        for v in res:
            res[v].append(spawn(Case(T, H, V, dtype, device, v, "fwd_bwd", "main_grad", warmup, repeats,
                                     chunk_mib, block_v if v == "loss_fused" else 0)))
    best = {v: {"time_s": min(r["time_s"] for r in rs), "peak_mib": max(r["peak_mib"] for r in rs)}
            for v, rs in res.items()}
    floor = 3 * best["gemm_floor"]["time_s"]
    row = {"T": T, "H": H, "V": V, "dtype": dtype, "device": device, "chunk_mib": chunk_mib, "block_v": block_v,
           "naive_s": best["loss_naive"]["time_s"], "chunked_s": best["loss_chunked"]["time_s"],
           "fused_s": best["loss_fused"]["time_s"], "floor_s": floor,
           "gemm_gflops": 2.0 * T * H * V / best["gemm_floor"]["time_s"] / 1e9,
           "naive_mib": best["loss_naive"]["peak_mib"], "chunked_mib": best["loss_chunked"]["peak_mib"],
           "fused_mib": best["loss_fused"]["peak_mib"]}
    row.update(speedup=row["naive_s"] / row["fused_s"], vs_chunked=row["chunked_s"] / row["fused_s"],
               floor_fraction=floor / row["fused_s"], mem_ratio=row["fused_mib"] / max(row["naive_mib"], 1e-9))
    print(loss_table([row]).splitlines()[-1], flush=True)
    print("  per round (s): " + "; ".join(f"{v.removeprefix('loss_')} " + " ".join(f"{r['time_s']:.2f}" for r in rs)
                                      for v, rs in res.items()) + " (gemm_floor: one torch.mm)", flush=True)
    return row


def chunk_profile(dtypes, T: int = 2048, H: int = 896, V: int = 151936, chunks=(192, 384, 1024),
                  block_v: int | None = None) -> None:
    """Where the fused loss's time goes against the floor: one chunk of ``c`` tokens through the CPU kernels
    (``fused_loss_logits`` alone, and + ``fused_loss_grads`` into an fp32 main_grad; vocab blocks of
    ``block_v`` rows, default the backend's) vs ``torch.mm`` on the same chunk, and ``torch.mm`` on all T
    tokens (the floor's rate); best of 3 after a warm-up, in this process."""
    import torch

    from dapo_mcore.ops import cpp_backend as be

    def best(f, n: int = 3) -> float:
        f()
        out = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            out = min(out, time.perf_counter() - t0)
        return out

    bv = block_v or be.LOSS_BLOCK_V
    print(f"(block_v {bv})")
    print("| dtype | chunk tokens | z MiB | torch.mm chunk GFLOP/s | vs full-T rate | logits (ms) | logits / mm(chunk) "
          "| fused chunk (ms) | fused / 3 mm(chunk) | projected floor fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dt in dtypes:
        torch.manual_seed(0)
        h = torch.empty(T, H).normal_(0.0, 0.5).to(_dtype(dt))
        w = torch.empty(V, H).normal_(0.0, 0.05).to(_dtype(dt))
        main_grad = torch.zeros(V, H)
        full = best(lambda: torch.mm(h, w.t()))
        full_rate = 2.0 * T * H * V / full
        for c in chunks:
            hc, yc = h[:c].contiguous(), torch.randint(0, V, (c,))
            mm = best(lambda: torch.mm(hc, w.t()))
            m, s, _, z = be.fused_loss_logits(hc, w, yc, 0, block_v=bv)
            lse, coef, gh = m + s.log(), torch.full((c,), 0.01), torch.empty(c, H)

            def logits() -> None:
                be.fused_loss_logits(hc, w, yc, 0, workspace=z, block_v=bv)

            def fused() -> None:
                logits()
                be.fused_loss_grads(hc, w, yc, lse, coef, z, 0, gh, main_grad, block_v=bv)

            tl, t = best(logits), best(fused)
            frac = 3 * 2.0 * c * H * V / full_rate / t
            print(f"| {dt} | {c} | {be.fused_loss_bytes_per_token(hc, V, bv) * c / 2**20:.0f} | "
                  f"{2.0 * c * H * V / mm / 1e9:.0f} | {2.0 * c * H * V / mm / full_rate:.2f} | {tl * 1e3:.0f} | "
                  f"{tl / mm:.2f} | {t * 1e3:.0f} | {t / (3 * mm):.2f} | {frac:.2f} |", flush=True)
            print(f"RESULT cpu_{dt}_chunk{c}_mm_rate_fraction {2.0 * c * H * V / mm / full_rate:.2f} x")
            print(f"RESULT cpu_{dt}_chunk{c}_projected_floor_fraction {frac:.2f} x")
        print(f"({dt}: torch.mm on all {T} tokens {full_rate / 1e9:.0f} GFLOP/s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU only, T=512, fp32, one timed run per variant")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write all rows here")
    ap.add_argument("--wgrad", choices=("both", "main_grad", "returned"), default="both",
                    help="weight-gradient setting(s) of the fwd+bwd rows (default both; see the docstring)")
    ap.add_argument("--dtype", choices=("both", "float32", "bfloat16"), default="both", help="CPU dtypes (full run)")
    ap.add_argument("--mode", choices=("both", "fwd", "fwd_bwd"), default="both")
    ap.add_argument("--what", choices=("all", "logprob", "loss", "chunks"), default="all",
                    help="the log-prob op rows, the DAPO-loss rows, or both (default); chunks: the fused loss's "
                         "kernels on one token chunk of several sizes against torch.mm on the same chunk")
    ap.add_argument("--chunk-mib", type=int, default=0,
                    help="DAPO-loss rows: the fused op's chunk budget in MiB (default: the op's, 128 on CPU); "
                         "its RESULT names then end in _chunk<N>mib")
    ap.add_argument("--block-v", type=int, default=None,
                    help="chunks and the DAPO-loss rows: vocab rows per block of the fused loss's CPU kernels "
                         "(default: the backend's LOSS_BLOCK_V); the loss rows' RESULT names then end in _blockv<N>")
    args = ap.parse_args(argv)
    if args.chunk_mib < 0 or (args.block_v is not None and args.block_v < 1):
        ap.error("--chunk-mib must be >= 0 and --block-v >= 1")
    if args.worker:
        print(json.dumps(run_case(Case(**json.loads(args.worker)))))
        return

    import torch

    if args.what == "chunks":
        chunk_profile(("float32", "bfloat16") if args.dtype == "both" else (args.dtype,), block_v=args.block_v)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
          f"{Path('/proc/loadavg').read_text().split()[:3] if Path('/proc/loadavg').exists() else '?'}", flush=True)
    print(table([]))
    wgrads = ("main_grad", "returned") if args.wgrad == "both" else (args.wgrad,)
    modes = ("fwd", "fwd_bwd") if args.mode == "both" else (args.mode,)
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    cpu_rows, loss_rows = [], []
    if args.what in ("all", "logprob"):
        if args.quick:
            cpu_rows = compare(512, 896, 151936, "float32", "cpu", warmup=0, repeats=1, rounds=1, wgrads=wgrads,
                               modes=modes)
        else:
            for dt in dtypes:
                cpu_rows += compare(2048, 896, 151936, dt, "cpu", warmup=1, repeats=1, rounds=2, wgrads=wgrads,
                                    modes=modes)
    if args.what in ("all", "loss"):
        print("\nDAPO loss from hidden states, fwd+bwd, weight gradient into main_grad (actions of "
              f"{ACTION_TOKENS} tokens; chunked = {CHUNK_TOKENS}-token chunks with recompute):")
        print(loss_table([]))
        for dt in (("float32",) if args.quick else dtypes):
            T = 512 if args.quick else 2048
            loss_rows.append(compare_loss(T, 896, 151936, dt, "cpu", warmup=0 if args.quick else 1, repeats=1,
                                          rounds=1 if args.quick else 3, chunk_mib=args.chunk_mib,
                                          block_v=args.block_v or 0))
    gpu_rows = []
    if torch.cuda.is_available() and not args.quick:
        for H in (3584, 8192):
            for tp in (1, 8):
                gpu_rows += compare(8192, H, 152064 // tp, "bfloat16", "cuda", warmup=2, repeats=5, rounds=1,
                                    wgrads=wgrads)

    print(f"\nRoofline estimate on {H100['name']}, fwd+bwd per TP rank, bf16 inputs "
          "(naive: GEMM time + its unfused [T, V] passes; per-token op and fused loss: see roofline()):")
    cols = (("naive", "naive"), ("per_token", "per-token op"), ("fused_loss", "fused loss"))
    print("| T | H | V | TP | " + " | ".join(f"{n} TFLOP | {n} GB | {n} ms" for _, n in cols) + " |")
    print("|---|---|---|---|" + "---|---|---|" * len(cols))
    for H in (3584, 8192):
        for tp in (1, 8):
            e = roofline(8192, H, 152064, tp)
            print(f"| 8192 | {H} | 152064 | {tp} | " + " | ".join(
                f"{e[k]['tflop']:.2f} | {e[k]['gbytes']:.1f} | {e[k]['ms']:.2f}" for k, _ in cols) + " |")
    if Path("/proc/loadavg").exists():
        print(f"load average at the end: {Path('/proc/loadavg').read_text().split()[:3]} (other jobs on a shared "
              "CPU inflate both variants' times)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_rows, "gpu": gpu_rows, "cpu_loss": loss_rows}, indent=1))

    tag = "cpu_quick" if args.quick else "cpu"
    for r in cpu_rows:
        name = tag + ("" if r["dtype"] == "float32" else f"_{r['dtype']}")
        if r["mode"] == "fwd":
            print(f"RESULT {name}_fwd_speedup {r['speedup']:.2f} x")
            continue
        name += "" if r["wgrad"] == "main_grad" else "_returned_wgrad"
        print(f"RESULT {name}_fwd_bwd_speedup {r['speedup']:.2f} x")
        print(f"RESULT {name}_fwd_bwd_cpu_time_ratio {r['cpu_speedup']:.2f} x")
        print(f"RESULT {name}_peak_mem_ratio {r['mem_ratio']:.3f} x")
        print(f"RESULT {name}_peak_mem_ratio_beyond_grad_outputs {r['mem_ratio_excl_grads']:.3f} x")
    for r in loss_rows:
        name = tag + ("" if r["dtype"] == "float32" else f"_{r['dtype']}") + "_fused_loss"
        sfx = f"_chunk{r['chunk_mib']}mib" if r["chunk_mib"] else ""
        sfx += f"_blockv{r['block_v']}" if r["block_v"] else ""
        print(f"RESULT {name}_fwd_bwd_speedup{sfx} {r['speedup']:.2f} x")
        print(f"RESULT {name}_speedup_vs_chunked{sfx} {r['vs_chunked']:.2f} x")
        print(f"RESULT {name}_gemm_floor_fraction{sfx} {r['floor_fraction']:.2f} x")
        print(f"RESULT {name}_peak_mem_ratio{sfx} {r['mem_ratio']:.3f} x")
    for r in gpu_rows:
        if r["mode"] == "fwd_bwd":
            name = f"gpu_T{r['T']}_H{r['H']}_V{r['V']}" + ("" if r["wgrad"] == "main_grad" else "_returned_wgrad")
            print(f"RESULT {name}_fwd_bwd_speedup {r['speedup']:.2f} x")
            print(f"RESULT {name}_peak_mem_ratio {r['mem_ratio']:.3f} x")


if __name__ == "__main__":
    main()
