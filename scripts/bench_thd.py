#!/usr/bin/env python
"""THD packed sequences vs the block-diagonal dense mask: tokens, attention-score entries and wall time of
one critic training epoch over the same examples, on a small megatron value model on CPU.

Data: ``--examples`` critic examples (random ids) with lengths uniform in ``[--min-len, --max-len]`` and a
label at every 8th position, FFD-packed into rows of ``--token-budget`` tokens, ``--rows`` rows per
micro-batch. Both variants run the same model, data, steps and loss (``value_forward_step``, BCE sums); only
the batch layout differs: ``dense_mask`` = rows padded to the longest row of the micro-batch with a
``[b, 1, L, L]`` block-diagonal mask; ``thd`` = the micro-batch's real tokens concatenated into ``[1, T]``
with ``PackedSeqParams(cu_seqlens)`` (no padding), through the CPU varlen core attention
(:class:`dapo_mcore.models.attention.ThdCoreAttention`; Transformer Engine's on a GPU).

The token and attention-entry ratios are exact counts (they carry over to a GPU); the CPU time is what this
machine gives with per-document SDPA calls (a GPU varlen kernel launches once per micro-batch).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_thd.py            # ~2-3 min on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_thd.py --quick    # ~30 s
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_examples(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    from dapo_mcore.critic.data import CriticExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        toks = torch.randint(2, vocab, (L,), generator=g).tolist()
        pos = list(range(7, L, 8))
        out.append(CriticExample(f"p{i}", toks, pos, torch.rand(len(pos), generator=g).tolist()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--global-batch", type=int, default=64, help="examples per optimizer step")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    if a.quick:
        a.examples, a.hidden, a.layers = 128, 128, 2

    from dapo_mcore.critic.data import pack_examples
    from dapo_mcore.critic.train import value_forward_step
    from dapo_mcore.models.convert import load_hf_weights
    from dapo_mcore.models.gpt import build_model_chunks
    from dapo_mcore.models.hf_config import load_arch, transformer_config
    from dapo_mcore.tasks.tiny import bench_checkpoint
    from dapo_mcore.packing import dp_share
    from dapo_mcore.parallel.fast_paths import PORTABLE
    from dapo_mcore.parallel.runtime import ParallelConfig, initialize_parallel
    from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench_thd_"))
    ck = bench_checkpoint(tmp / "m", a.hidden, a.layers)
    initialize_parallel(ParallelConfig())
    arch = load_arch(ck)
    examples = make_examples(a.examples, a.min_len, a.max_len, arch.vocab_size)
    steps = [examples[i:i + a.global_batch] for i in range(0, len(examples), a.global_batch)]
    print(f"data: {len(examples)} examples of {a.min_len}-{a.max_len} tokens ({sum(map(len, examples))} tokens), "
          f"token budget {a.token_budget}, {a.rows} rows/micro-batch, {len(steps)} steps; model hidden {a.hidden}, "
          f"{a.layers} layers")
    res = {}
    for packing in ("dense_mask", "thd"):
        paths = dataclasses.replace(PORTABLE, packing=packing)
        chunks = build_model_chunks(arch, transformer_config(arch, paths=paths), value_head=True, paths=paths)
        load_hf_weights(chunks, ck, arch, init_value_head=True)
        trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-5), total_steps=len(steps), paths=paths)
        batches = [pack_examples(s, a.token_budget, 0, a.rows, packing) for s in steps]
        tokens = attn = 0
        for mbs in batches:
            for m in mbs:
                if packing == "thd":
                    cu = m["packed_seq_params"].cu_seqlens_q.long()
                    tokens += int(m["input_ids"].numel())
                    attn += int(((cu[1:] - cu[:-1]) ** 2).sum())
                else:
                    b, L = m["input_ids"].shape
                    tokens += b * L
                    attn += b * L * L
        trainer.train_step(dp_share(batches[0], 0), value_forward_step)      # warm-up (not timed)
        t0 = time.perf_counter()
        losses = [trainer.train_step(dp_share(mbs, 0), value_forward_step).loss for mbs in batches]
        dt = time.perf_counter() - t0
        res[packing] = (tokens, attn, dt, losses)
        print(f"{packing:10s}: {tokens} tokens, {attn} attention entries, epoch {dt:.2f} s "
              f"({dt / len(batches):.3f} s/step), first losses {[round(x, 5) for x in losses[:3]]}")
    (td, ad, dd, ld), (tt, at, dtt, lt) = res["dense_mask"], res["thd"]
    drift = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(ld, lt))
    print(f"max relative loss difference thd vs dense over the epoch: {drift:.2e}")
    print(f"RESULT thd_token_ratio {tt / td:.4f} x")
    print(f"RESULT thd_attention_entries_ratio {at / ad:.4f} x")
    print(f"RESULT thd_critic_epoch_speedup_cpu {dd / dtt:.3f} x")


if __name__ == "__main__":
    main()
