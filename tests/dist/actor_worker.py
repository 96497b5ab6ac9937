"""torchrun worker for the actor tests (gloo on CPU).

  step TP PP MODEL ADV OUT [--unshared] [--impl cpp|reference]
       one DAPO step on the first 6 kept states -> OUT/loss.json, OUT/grads.safetensors (HF-named)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dapo_mcore.actor.train import dapo_forward_step, load_groups
from dapo_mcore.training.logprobs import pack_action_groups
from dapo_mcore.models.convert import collect_hf_state, load_hf_weights
from dapo_mcore.models.gpt import build_model_chunks
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel
from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

BETA = 0.5


def shifted_groups(adv_dir):
    """The first 6 kept states, with the stored ref log-probs shifted per token (deterministically) so that
    log π_θ/π_ref is far from 0 at the start and the ratio term of the loss is exercised."""
    groups = load_groups(adv_dir)[:6]
    for gi, g in enumerate(groups):
        g.ref_logp = [[x + 0.3 * ((gi + 2 * ai + t) % 5 - 2) for t, x in enumerate(lp)]
                      for ai, lp in enumerate(g.ref_logp)]
    return groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("tp", type=int)
    ap.add_argument("pp", type=int)
    ap.add_argument("model")
    ap.add_argument("adv")
    ap.add_argument("out")
    ap.add_argument("--unshared", action="store_true")
    ap.add_argument("--impl", default=None)
    ap.add_argument("--budget", type=int, default=160)
    ap.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    args = ap.parse_args()
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    arch = load_arch(args.model)
    chunks = build_model_chunks(arch, transformer_config(arch, tp=args.tp, pp=args.pp))
    load_hf_weights(chunks, args.model, arch)
    groups = shifted_groups(args.adv)
    mbs = pack_action_groups(groups, args.budget, 0, shared=not args.unshared, rows_per_microbatch=args.rows)
    trainer = MegatronTrainer(chunks, OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0), total_steps=1)
    res = trainer.train_step(dp_share(mbs, 0), dapo_forward_step(BETA, args.impl))
    grads = collect_hf_state(trainer.chunks, arch, lambda n, p: p.main_grad)
    if torch.distributed.get_rank() == 0:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in grads.items()}, str(out / "grads.safetensors"))
        (out / "loss.json").write_text(json.dumps({"loss": res.loss, "count": res.count, "rows": len(mbs),
                                                   "tokens": sum(int(m["lengths"].sum()) for m in mbs),
                                                   **res.logs}))
    destroy_parallel()


if __name__ == "__main__":
    main()
