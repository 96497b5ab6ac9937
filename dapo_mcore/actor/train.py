"""Stage 5 — actor: DAPO training of the policy on the advantage dataset.

    L(θ) = ½ · mean over actions of (A/β − log π_θ(a|s)/π_ref(a|s))²,   log π(a|s) = Σ_tokens log p

through the fused ops (:func:`dapo_mcore.ops.fused_target_logprob` on the final hidden states and the
vocab-parallel output weight — never [tokens x vocab] logits — and :func:`dapo_mcore.ops.dapo_loss`).
**State-wise batching**: a state's actions are never split across steps or micro-batches (contrastive
gradients); a step takes whole states until it holds ``global_batch_actions`` actions.
**Shared-prefix packing**: one row = state once + all its actions, several states per row.
The reference log-probs were stored by the advantage stage: π_ref is never loaded here.

Runs on every rank: ``python -m dapo_mcore.actor.train --help``. Outputs in ``out_dir``: ``checkpoints/``,
``hf/`` (the new policy), ``metrics.jsonl``, ``tb/``, ``summary.json`` (written last).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dapo_mcore.actor.batching import ActionGroup, dapo_forward_step, pack_action_groups
from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.runtime import ParallelConfig, add_parallel_args, parallel_from_args


@dataclass
class ActorConfig:
    """Paper defaults: β 0.01–0.02, lr 5e-7, global batch 2048 actions, 1 epoch."""

    init_path: str = ""                 # the reference policy (π_ref) HF checkpoint
    beta: float = 0.01
    lr: float = 5e-7
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "constant"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta2: float = 0.95
    epochs: int = 1
    global_batch_actions: int = 2048    # actions per optimizer step (whole states)
    token_budget: int = 4096            # tokens per packed row
    rows_per_microbatch: int = 1        # packed rows stacked per micro-batch
    shared_prefix: bool = True          # False: each (s, a) its own document (baseline)
    seed: int = 0
    save_interval: int = 0
    max_steps: int = 0
    show_progress: bool = True
    tensorboard: bool = True
    ops_impl: Optional[str] = None      # force "cpp" | "triton" | "reference" (default: auto)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)   # layout + fast_paths

    def validate(self) -> None:
        if not self.init_path:
            raise ValueError("actor.init_path is required (the reference policy HF checkpoint)")
        if not self.beta > 0:
            raise ValueError(f"actor.beta must be > 0, got {self.beta}")
        if self.global_batch_actions < 1:
            raise ValueError(f"actor.global_batch_actions must be >= 1, got {self.global_batch_actions}")


def load_groups(adv_dir: str | Path) -> list[ActionGroup]:
    """The kept states of an advantage output as :class:`ActionGroup` (advantages + per-token ref log-probs)."""
    from dapo_mcore.data.shards import iter_records

    groups = []
    for r in iter_records(adv_dir):
        if not r["keep"]:
            continue
        acts = r["actions"]
        groups.append(ActionGroup(list(r["state_ids"]), [list(a["ids"]) for a in acts],
                                  [float(a["advantage"]) for a in acts], [list(a["ref_logp"]) for a in acts],
                                  key=r["state_id"]))
    return groups


def state_batches(groups: Sequence[ActionGroup], global_batch_actions: int, epochs: int, seed: int) -> list[list[int]]:
    """Group indices of every step: per epoch a seeded shuffle of the states, cut into steps of whole states
    holding at least ``global_batch_actions`` actions (the last step of an epoch may hold fewer)."""
    steps = []
    for ep in range(epochs):
        order = list(range(len(groups)))
        random.Random(seed * 1000 + ep).shuffle(order)
        cur, n = [], 0
        for gi in order:
            cur.append(gi)
            n += len(groups[gi].actions)
            if n >= global_batch_actions:
                steps.append(cur)
                cur, n = [], 0
        if cur:
            steps.append(cur)
    return steps


def run_train_actor(cfg: ActorConfig, adv_dir: str | Path, out_dir: str | Path) -> dict:
    """Train (or resume) the actor on a finished advantage output; returns the summary (every rank)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from dapo_mcore.models.convert import save_hf_checkpoint
    from dapo_mcore.parallel.runtime import initialize_parallel
    from dapo_mcore.training.loop import (LoopConfig, load_chunks, make_trainer, pad_token_id, read_metrics, resume,
                                          run_loop, write_summary)

    cfg.validate()
    out = Path(out_dir)
    t0 = time.time()
    initialize_parallel(cfg.parallel)
    pad_id = pad_token_id(AutoTokenizer.from_pretrained(cfg.init_path))
    groups = load_groups(adv_dir)
    if not groups:
        raise ValueError(f"{adv_dir}: no kept states to train on (the gap filter removed every state?)")
    too_long = [g.key for g in groups if g.cost(cfg.shared_prefix) > cfg.token_budget]
    if too_long:
        raise ValueError(f"{len(too_long)} states need more than token_budget={cfg.token_budget} tokens "
                         f"(e.g. {too_long[0]}); raise actor.token_budget")
    arch, chunks = load_chunks(cfg.init_path, cfg.parallel)
    steps = state_batches(groups, cfg.global_batch_actions, cfg.epochs, cfg.seed)
    trainer = make_trainer(chunks, cfg, total_steps=len(steps))
    resume(trainer, out / "checkpoints")
    loop = LoopConfig("actor", len(steps), cfg.save_interval, cfg.max_steps, cfg.show_progress, cfg.tensorboard)
    finished = run_loop(
        trainer, loop, out,
        lambda i: dp_share(pack_action_groups([groups[g] for g in steps[i]], cfg.token_budget, pad_id,
                                              cfg.shared_prefix, cfg.rows_per_microbatch), pad_id),
        dapo_forward_step(cfg.beta, cfg.ops_impl),
        lambda r: {"loss": r.loss, "abs_log_ratio": r.logs["abs_log_ratio"], "kl_k3": r.logs["kl_k3"],
                   "sign_agree": r.logs["sign_agree"], "grad_norm": r.grad_norm, "lr": r.lr, "actions": r.count})
    if not finished:
        return {"stage": "train-actor", "partial": True, "steps": trainer.step, "total_steps": len(steps)}
    save_hf_checkpoint(trainer.chunks, out / "hf", arch, source_dir=cfg.init_path)
    hist = read_metrics(out)
    summary = {"stage": "train-actor", "states": len(groups), "actions": sum(len(g.actions) for g in groups),
               "steps": trainer.step, "epochs": cfg.epochs, "seconds": time.time() - t0,
               "first": hist[0] if hist else None, "last": hist[-1] if hist else None,
               "config": json.loads(json.dumps(asdict(cfg), default=str)),
               "paths": trainer.paths.as_dict()}
    write_summary(out, summary)
    if dist.get_rank() == 0:
        last = summary["last"] or {}
        print(f"[actor] {trainer.step} steps on {summary['actions']} actions: loss {last.get('loss', float('nan')):.4g}, "
              f"|log-ratio| {last.get('abs_log_ratio', float('nan')):.3g}, sign agreement "
              f"{last.get('sign_agree', float('nan')):.3f}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="DAPO stage 5: train the actor with the DAPO loss (megatron).")
    ap.add_argument("--adv", required=True, help="output directory of the advantage stage")
    ap.add_argument("--init", required=True, help="reference policy HF checkpoint (pi_ref)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--no-shared-prefix", action="store_true", help="lay out each (s, a) separately")
    add_parallel_args(ap)   # also --global-batch (actions), --micro-batch (rows), fast-path flags
    ap.add_argument("--global-batch-actions", dest="global_batch", type=int, help="alias of --global-batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop (resumably) after this many steps")
    a = ap.parse_args(argv)
    d = ActorConfig()
    cfg = ActorConfig(init_path=a.init, beta=a.beta, lr=a.lr, epochs=a.epochs,
                      global_batch_actions=a.global_batch or d.global_batch_actions, token_budget=a.token_budget,
                      rows_per_microbatch=a.micro_batch or d.rows_per_microbatch,
                      shared_prefix=not a.no_shared_prefix, seed=a.seed, max_steps=a.max_steps,
                      parallel=parallel_from_args(a))
    run_train_actor(cfg, a.adv, a.out)


if __name__ == "__main__":
    from dapo_mcore.parallel.runtime import process_group_scope

    with process_group_scope():
        main()
