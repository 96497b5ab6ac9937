#!/usr/bin/env python
"""Benchmark: the mc stage (N completions per state) on a tiny model, in the embedded engine without
prefix-KV reuse, with reuse within a state (its N samples share the prefix) and with the radix
cache (also across states: the states of a solution are nested prefixes, the solutions of a problem
share the prompt and their first steps), in the same run.

Builds a random tiny Qwen2 model (default hidden 256, 4 layers: big enough that prefill costs),
writes a generate-stage output of long chain-task solutions (every state >= --min-state-tokens;
--solutions per problem: the true one, and one that leaves it after two steps), runs ``run_mc``
three times (same seeds, same batches) and prints::

    RESULT mc_samples_per_s_reuse <v> samples/s      (reuse within a state)
    RESULT mc_samples_per_s_no_reuse <v> samples/s
    RESULT mc_reuse_speedup <v> x
    RESULT mc_prompt_cache_fraction <v> fraction     (prompt tokens served from cache, within-state run)
    RESULT mc_identical_completions <v> fraction     (same tokens in both runs: reuse is exact)
    RESULT mc_samples_per_s_radix <v> samples/s      (radix cache: reuse across states too)
    RESULT mc_prompt_cache_fraction_radix <v> fraction
    RESULT mc_identical_completions_radix <v> fraction   (radix run vs no-reuse run)
    RESULT mc_radix_speedup <v> x                    (samples/s with cross-state reuse over within-state)

``--prefix-pass`` instead times the engine's prefix pass alone (``EmbeddedEngine._prefill``) on the same
model and solutions, with ``prefix_attention`` (bit-stable) and with math SDPA (the kernel it replaced: its
bits change with the KV width), interleaved rounds, process CPU, and prints::

    RESULT prefix_pass_cpu_s_scratch <v> s            (every solution's prefix from nothing, min over rounds)
    RESULT prefix_pass_cpu_s_scratch_sdpa_math <v> s
    RESULT prefix_pass_sdpa_math_over_ours_scratch <v> x
    RESULT prefix_pass_cpu_s_increment <v> s          (their last 32 tokens on the KV of the rest: radix-style)
    RESULT prefix_pass_cpu_s_increment_sdpa_math <v> s
    RESULT prefix_pass_sdpa_math_over_ours_increment <v> x

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout.py [--states 32 --n 16 ...] [--prefix-pass]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_mcore.data.shards import ShardedWriter, iter_records  # noqa: E402
from dapo_mcore.mc.stage import MCConfig, run_mc  # noqa: E402
from dapo_mcore.rollout.common import BackendConfig  # noqa: E402
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig  # noqa: E402
from dapo_mcore.tasks.tiny import TinyModelConfig, build_tiny_checkpoint  # noqa: E402
from dapo_mcore.tasks.chain import make_problems  # noqa: E402

PREAMBLE = "Apply the operations one at a time. Write one line per operation, then the answer line. "


def write_solutions(work: Path, tok, n_problems: int, n_ops: int, min_state: int,
                    n_solutions: int = 1) -> tuple[Path, list[int]]:
    """A generate-stage output with the correct solution of every problem and, with ``n_solutions=2``,
    a wrong one that leaves it after two steps; returns (dir, prompt lengths)."""
    probs = make_problems(n_problems, seed=7, n_ops=(n_ops, n_ops))
    pre = PREAMBLE
    while len(tok(pre + probs[0].prompt)["input_ids"]) < min_state:
        pre += PREAMBLE
    w = ShardedWriter(work / "gen", "generate", {"bench": [n_problems, n_ops, min_state, n_solutions]}, "parquet",
                      overwrite=True)
    recs, lens = [], []
    for p in probs:
        pids = tok(pre + p.prompt)["input_ids"]
        lines = p.solution().split("\n")
        texts = [(p.solution(), 1.0), ("\n".join(lines[:2] + [lines[2] + "1"] + lines[3:]), 0.0)][:n_solutions]
        sols = [{"sample_index": i, "output_ids": tok(t)["input_ids"] + [tok.eos_token_id], "text": t, "reward": r,
                 "finish": "stop"} for i, (t, r) in enumerate(texts)]
        recs.append({"problem_id": p.id, "prompt": pre + p.prompt, "answer": p.answer, "prompt_ids": pids,
                     "num_samples": len(sols), "num_correct": 1, "rewards": [s["reward"] for s in sols],
                     "solutions": sols})
        lens.append(len(pids))
    w.write_shard(0, recs)
    w.finalize(1)
    return work / "gen", lens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--ops", type=int, default=6, help="steps per solution (states per solution = ops + 2)")
    ap.add_argument("--solutions", type=int, choices=(1, 2), default=2,
                    help="kept solutions per problem (2: the second shares the prompt and the first two steps)")
    ap.add_argument("--n", type=int, default=16, help="completions per state (N)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--min-state-tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-batch-rows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--prefix-pass", action="store_true", help="time the prefix pass alone (see above), not mc")
    ap.add_argument("--rounds", type=int, default=7, help="--prefix-pass: interleaved rounds")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_rollout_"))
    texts = [PREAMBLE + p.prompt + p.solution() for p in make_problems(500, seed=1, n_ops=(3, a.ops))]
    mcfg = TinyModelConfig(hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75) // 16 * 16,
                           num_layers=a.layers, num_heads=max(4, a.hidden // 64), num_kv_heads=2,
                           max_position_embeddings=2048)
    ckpt = build_tiny_checkpoint(work / "model", texts, mcfg, seed=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    gen, prompt_lens = write_solutions(work, tok, a.problems, a.ops, a.min_state_tokens, a.solutions)
    if a.prefix_pass:
        bench_prefix_pass(EmbeddedEngine(EngineConfig(str(ckpt))), gen, a.rounds)
        return
    # the same mc config (seeds, batches) for every engine mode; the engine is built before the clock starts
    modes = {"no_reuse": dict(prefix_reuse=False), "within_state": dict(radix_cache_bytes=0), "radix": dict()}
    model = None
    out = {}
    for mode, kw in modes.items():
        engine = EmbeddedEngine(EngineConfig(str(ckpt), max_batch_rows=a.max_batch_rows, **kw), model=model)
        model = engine.model
        cfg = MCConfig(str(ckpt), num_completions=a.n, max_new_tokens=a.max_new_tokens, shard_size=10_000,
                       batch_requests=max(1, a.max_batch_rows // a.n), show_progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        s = run_mc(cfg, gen, work / f"mc_{mode}", backend=engine, overwrite=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[mode] = (s, wall, list(iter_records(work / f"mc_{mode}")))
        th, st = s["throughput"], engine.stats
        print(f"{mode}: {th['samples']} samples, {s['states'] - s['terminal_states']} states, "
              f"{th['seconds']:.1f} s, {th['samples_per_s']:.1f} samples/s, {th['tokens_per_s']:.0f} tok/s, "
              f"cache {th['cache_hit_rate']:.1%}, prompt tokens run {st.prompt_tokens - st.cached_tokens} "
              f"of {st.prompt_tokens} (stage wall {wall:.1f} s, process cpu {cpu:.1f} s)", flush=True)

    def identical(x: str, y: str) -> float:
        pairs = [(ca["output_ids"], cb["output_ids"]) for ra, rb in zip(out[x][2], out[y][2])
                 for ca, cb in zip(ra["completions"], rb["completions"])]
        return sum(p == q for p, q in pairs) / max(len(pairs), 1)

    state_lens = [len(r["prompt_ids"]) + sum(len(x) for x in r["step_ids"]) for r in out["radix"][2] if not r["terminal"]]
    print(json.dumps({"min_state_tokens": min(state_lens), "mean_state_tokens": sum(state_lens) / len(state_lens),
                      "solutions_per_problem": a.solutions, "model": mcfg.__dict__, "N": a.n, "threads": a.threads}))
    rate = {m: out[m][0]["throughput"]["samples_per_s"] for m in modes}
    frac = {m: out[m][0]["throughput"]["cache_hit_rate"] for m in modes}
    print(f"RESULT mc_samples_per_s_reuse {rate['within_state']:.2f} samples/s")
    print(f"RESULT mc_samples_per_s_no_reuse {rate['no_reuse']:.2f} samples/s")
    print(f"RESULT mc_reuse_speedup {rate['within_state'] / rate['no_reuse']:.2f} x")
    print(f"RESULT mc_prompt_cache_fraction {frac['within_state']:.4f} fraction")
    print(f"RESULT mc_identical_completions {identical('within_state', 'no_reuse'):.4f} fraction")
    print(f"RESULT mc_samples_per_s_radix {rate['radix']:.2f} samples/s")
    print(f"RESULT mc_prompt_cache_fraction_radix {frac['radix']:.4f} fraction")
    print(f"RESULT mc_identical_completions_radix {identical('radix', 'no_reuse'):.4f} fraction")
    print(f"RESULT mc_radix_speedup {rate['radix'] / rate['within_state']:.2f} x")
    bench_sglang(ckpt, gen, work, a.n, a.max_new_tokens, max(1, a.max_batch_rows // a.n), out["radix"][0])


def bench_prefix_pass(engine: EmbeddedEngine, gen: Path, rounds: int) -> None:
    """``--prefix-pass`` (module doc): min process CPU over ``rounds`` interleaved rounds of each variant."""
    import torch.nn.functional as F

    from dapo_mcore.rollout import embedded

    def sdpa_math(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            o = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                               attn_mask=attention_mask, scale=scaling)
        return o.transpose(1, 2).contiguous(), None

    seqs = [r["prompt_ids"] + s["output_ids"] for r in iter_records(gen) for s in r["solutions"]]
    heads, tails = [x[:-32] for x in seqs], [x[-32:] for x in seqs]
    variants = {"ours": embedded.prefix_attention, "sdpa_math": sdpa_math}
    best: dict[tuple[str, str], float] = {}
    with torch.no_grad():
        pasts = engine._prefill([[] for _ in heads], heads)
        cases = {"scratch": lambda: engine._prefill([[] for _ in seqs], seqs),
                 "increment": lambda: engine._prefill([[p] for p in pasts], tails)}
        try:
            for r in range(rounds + 1):          # round 0: warm-up
                for v, fn in variants.items():
                    embedded.prefix_attention = fn  # what the engine registers for its prefix pass
                    for c, f in cases.items():
                        c0 = time.process_time()
                        f()
                        if r:
                            best[c, v] = min(best.get((c, v), float("inf")), time.process_time() - c0)
        finally:
            embedded.prefix_attention = variants["ours"]
    print(f"prefix pass: {len(seqs)} sequences of {min(map(len, seqs))}-{max(map(len, seqs))} tokens "
          f"({sum(map(len, seqs))} in all; increment: their last 32), min process CPU of {rounds} rounds", flush=True)
    for c in cases:
        print(f"RESULT prefix_pass_cpu_s_{c} {best[c, 'ours']:.3f} s")
        print(f"RESULT prefix_pass_cpu_s_{c}_sdpa_math {best[c, 'sdpa_math']:.3f} s")
        print(f"RESULT prefix_pass_sdpa_math_over_ours_{c} {best[c, 'sdpa_math'] / best[c, 'ours']:.2f} x")


def bench_sglang(ckpt: Path, gen: Path, work: Path, n: int, max_new_tokens: int, batch_requests: int,
                 embedded_summary: dict) -> None:
    """The same mc workload (same states, same N) on the real SGLang CPU server (one server launched
    by the fleet with the CPU flags, radix cache on), beside the embedded engine's figures. Prints
    ``RESULT mc_sglang_samples_per_s`` and ``RESULT mc_sglang_prompt_cache_fraction``; skipped with a
    message when the SGLang venv (scripts/setup.sh --sglang) is absent. The server's start-up is not
    timed: samples/s is the mc stage's own meter, from the first request on."""
    import subprocess

    from dapo_mcore.rollout.fleet import resolve_python, serving

    cfg = BackendConfig("sglang", launch=True, port=0, device="cpu", concurrency=batch_requests,
                        server_args=["--max-total-tokens", "65536"], log_dir=str(work / "sglang-logs"))
    py = resolve_python(cfg)
    if not Path(py).exists() or subprocess.run([py, "-c", "import importlib.util as u, sys; "
                                                "sys.exit(0 if u.find_spec('sglang') else 1)"]).returncode:
        print(f"SKIP mc on the real SGLang server: no SGLang venv ({py}); run scripts/setup.sh --sglang", flush=True)
        return
    mcfg = MCConfig(str(ckpt), num_completions=n, max_new_tokens=max_new_tokens, shard_size=10_000,
                    batch_requests=batch_requests, show_progress=False, backend=cfg)
    with serving(cfg, ckpt) as backend:
        s = run_mc(mcfg, gen, work / "mc_sglang", backend=backend, overwrite=True)
    th, emb = s["throughput"], embedded_summary["throughput"]
    print(f"sglang server: {th['samples']} samples, {th['seconds']:.1f} s, {th['samples_per_s']:.1f} samples/s, "
          f"cache {th['cache_hit_rate']:.1%} | embedded (radix cache): {emb['samples_per_s']:.1f} samples/s, "
          f"cache {emb['cache_hit_rate']:.1%}", flush=True)
    print(f"RESULT mc_sglang_samples_per_s {th['samples_per_s']:.2f} samples/s")
    print(f"RESULT mc_sglang_prompt_cache_fraction {th['cache_hit_rate']:.4f} fraction")


if __name__ == "__main__":
    main()
