#!/usr/bin/env python
"""Shared-prefix vs unshared packing: tokens processed and wall time for one actor epoch and for critic
scoring over the same state/action data, on a small megatron model on CPU.

Data: ``--states`` states of ``--state-len`` tokens, each with ``--actions`` actions of ``--action-len``
tokens (random ids; advantages and reference log-probs random). Expected token ratio
n·(L_s + L_a) / (L_s + n·L_a). Both variants run the same model, data, steps and loss; only the row layout
differs (``ActorConfig.shared_prefix``).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_packing.py            # full (~2-4 min on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_packing.py --quick    # ~30 s
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_groups(n_states: int, n_act: int, ls: int, la: int, vocab: int, seed: int = 0):
    from dapo_mcore.training.logprobs import ActionGroup

    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(n_states):
        state = torch.randint(2, vocab, (ls,), generator=g).tolist()
        acts = [torch.randint(2, vocab, (la,), generator=g).tolist() for _ in range(n_act)]
        adv = (torch.rand(n_act, generator=g) - 0.5).tolist()
        ref = [(-torch.rand(la, generator=g) * 3).tolist() for _ in range(n_act)]
        groups.append(ActionGroup(state, acts, adv, ref))
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--states", type=int, default=256)
    ap.add_argument("--actions", type=int, default=8)
    ap.add_argument("--state-len", type=int, default=192)
    ap.add_argument("--action-len", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--global-batch-actions", type=int, default=256)
    a = ap.parse_args()
    if a.quick:
        a.states, a.hidden, a.layers = 48, 128, 2

    from dapo_mcore.actor.train import dapo_forward_step, state_batches
    from dapo_mcore.models.convert import load_hf_weights
    from dapo_mcore.models.gpt import build_model_chunks
    from dapo_mcore.models.hf_config import load_arch, transformer_config
    from dapo_mcore.packing import dp_share
    from dapo_mcore.parallel.runtime import ParallelConfig, initialize_parallel
    from dapo_mcore.tasks.tiny import bench_checkpoint
    from dapo_mcore.training.logprobs import pack_action_groups
    from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig
    from dapo_mcore.training.values import ScoreGroup, score_groups

    tmp = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    ck = bench_checkpoint(tmp / "m", a.hidden, a.layers)
    initialize_parallel(ParallelConfig())
    arch = load_arch(ck)
    groups = make_groups(a.states, a.actions, a.state_len, a.action_len, arch.vocab_size)
    steps = state_batches(groups, a.global_batch_actions, 1, 0)
    n, ls, la = a.actions, a.state_len, a.action_len
    expected = n * (ls + la) / (ls + n * la)
    print(f"data: {a.states} states x {n} actions, L_s={ls}, L_a={la}; model hidden {a.hidden}, {a.layers} layers; "
          f"{len(steps)} steps of {a.global_batch_actions} actions; expected token ratio {expected:.2f}")
    res = {}
    for shared in (True, False):
        chunks = build_model_chunks(arch, transformer_config(arch))
        load_hf_weights(chunks, ck, arch)
        trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-5), total_steps=len(steps))
        step_fn = dapo_forward_step(0.1)
        tokens, t0 = 0, time.perf_counter()
        for s in steps:
            mbs = pack_action_groups([groups[i] for i in s], a.token_budget, 0, shared=shared)
            tokens += sum(int(m["lengths"].sum()) for m in mbs)
            trainer.train_step(dp_share(mbs, 0), step_fn)
        dt = time.perf_counter() - t0
        # critic-style scoring (forward only) of the same groups: V(s+a) for every action
        sg = [ScoreGroup(g.state, g.actions) for g in groups] if shared else \
            [ScoreGroup(g.state + act, []) for g in groups for act in g.actions]
        t1 = time.perf_counter()
        score_groups(trainer.chunks, sg, a.token_budget, 0)
        ds = time.perf_counter() - t1
        res[shared] = (tokens, dt, ds)
        label = "shared" if shared else "unshared"
        print(f"{label:9s} actor epoch: {tokens} tokens, {dt:.2f} s ({dt / len(steps):.3f} s/step); "
              f"scoring {sum(len(g.actions) for g in groups)} actions: {ds:.2f} s")
    (ts, dts, dss), (tu, dtu, dsu) = res[True], res[False]
    print(f"RESULT packing_expected_token_ratio {expected:.3f} x")
    print(f"RESULT packing_token_ratio {tu / ts:.3f} x")
    print(f"RESULT actor_epoch_speedup_shared_prefix {dtu / dts:.3f} x")
    print(f"RESULT actor_step_time_shared {dts / len(steps):.4f} s")
    print(f"RESULT actor_step_time_unshared {dtu / len(steps):.4f} s")
    print(f"RESULT scoring_speedup_shared_prefix {dsu / dss:.3f} x")


if __name__ == "__main__":
    main()
