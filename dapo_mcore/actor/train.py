"""Stage 5 — actor: DAPO training of the policy on the advantage dataset.

    L(θ) = ½ · mean over actions of (A/β − log π_θ(a|s)/π_ref(a|s))²,   log π(a|s) = Σ_tokens log p

through the fused ops (:func:`dapo_mcore.ops.fused_target_logprob` on the final hidden states and the
vocab-parallel output weight — never [tokens x vocab] logits — and :func:`dapo_mcore.ops.dapo_loss`).
**State-wise batching**: a state's actions are never split across steps or micro-batches (contrastive
gradients); a step takes whole states until it holds ``global_batch_actions`` actions.
**Shared-prefix packing**: one row = state once + all its actions, several states per row.
The reference log-probs were stored by the advantage stage: π_ref is never loaded here.

Runs on every rank (in the pipeline's process, or under ``torchrun``): ``dapo-mcore train-actor CONFIG``
(section ``actor``; ``--help`` lists the keys). Outputs in ``out_dir``: ``checkpoints/``,
``hf/`` (the new policy), ``metrics.jsonl``, ``tb/``, ``summary.json`` (written last).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from dapo_mcore.config import option
from dapo_mcore.data.shards import iter_records
from dapo_mcore.models.convert import save_hf_checkpoint
from dapo_mcore.ops import fused_dapo_loss
from dapo_mcore.ops.dispatch import IMPLS
from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.runtime import initialize_parallel
from dapo_mcore.training.config import TrainingConfig
from dapo_mcore.training.logprobs import ActionGroup, output_inputs, pack_action_groups, token_logp
from dapo_mcore.training.loop import load_chunks, make_trainer, pad_token_id, read_metrics, resume, run_loop, save_summary
from dapo_mcore.training.trainer import make_loss_fn


@dataclass
class ActorConfig(TrainingConfig):
    """Stage 5 (train-actor). Paper: β 0.01–0.02, lr 5e-7, global batch 2048 actions, 1 epoch."""

    init_path: str = option("", "HF checkpoint of the reference policy (π_ref), the actor's start", identity=False)
    lr: float = option(5e-7, "peak learning rate", gt=0)
    beta: float = option(0.01, "β of the DAPO loss (A/β is the log-ratio target)", gt=0)
    global_batch_actions: int = option(2048, "actions per optimizer step (whole states)", flag="--global-batch",
                                       ge=1)
    shared_prefix: bool = option(True, "pack a state once with all its actions (False: each (s, a) its own "
                                       "document, the baseline)")
    ops_impl: Optional[str] = option(None, "force the fused ops' backend: auto | triton | cpp | reference "
                                              "(default: auto)", choices=IMPLS)

    def validate(self) -> None:
        if not self.init_path:
            raise ValueError("actor.init_path is required (the reference policy HF checkpoint)")


def dapo_forward_step(beta: float, impl: Optional[str] = None):
    """Training step factory: loss sum = ½ Σ_actions (A/β − Σ_tokens(logp − ref_logp))², count = #actions,
    through :func:`~dapo_mcore.ops.fused_dapo_loss` (logits once per token chunk, 6·T·H·V, grad_weight into
    megatron's ``main_grad``; the per-token op + loss it replaces is its tested reference).

    Extra sums logged per action: ``abs_log_ratio``, ``kl_k3`` (estimate of KL(π_ref‖π_θ) on the
    reference's own actions: e^ρ − 1 − ρ), ``sign_agree`` (log-ratio moved with the sign of A; A = 0
    counts as agreement only when ρ = 0).
    """
    def step(model, batch):
        hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden")

        def compute(hs):
            n_act = len(batch["action_keys"])
            if n_act == 0:
                # A DP-padding micro-batch: zero loss, but through the per-token op (T=0), so the output weight
                # still receives a gradient and megatron DDP's grad-ready hook fires for it (with
                # overlap_grad_reduce every param must report ready each step).
                zero = hs.sum() * 0.0 + token_logp(model, hs, batch, impl).sum() * 0.0
                return zero, 0, {"abs_log_ratio": 0.0, "kl_k3": 0.0, "sign_agree": 0.0}
            h, w, tp_group = output_inputs(model, hs, batch)
            out = fused_dapo_loss(h, w, batch["tgt"], batch["ref_logp"].to(torch.float32), batch["seg"],
                                  batch["advantages"].to(torch.float32), beta, normalizer=1.0, tp_group=tp_group,
                                  impl=impl)
            rho, adv = out.log_ratio.double(), batch["advantages"].double()
            return out.loss, n_act, {"abs_log_ratio": rho.abs().sum(), "kl_k3": (torch.exp(rho) - 1 - rho).sum(),
                                     "sign_agree": (torch.sign(rho) == torch.sign(adv)).double().sum()}

        return hidden, make_loss_fn(compute)

    return step


def load_groups(adv_dir: str | Path) -> list[ActionGroup]:
    """The kept states of an advantage output as :class:`ActionGroup` (advantages + per-token ref log-probs)."""
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
    from transformers import AutoTokenizer

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
    loop = cfg.loop("actor", len(steps))
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
    save_summary(out, summary)
    if dist.get_rank() == 0:
        last = summary["last"] or {}
        print(f"[actor] {trainer.step} steps on {summary['actions']} actions: loss {last.get('loss', float('nan')):.4g}, "
              f"|log-ratio| {last.get('abs_log_ratio', float('nan')):.3g}, sign agreement "
              f"{last.get('sign_agree', float('nan')):.3f}")
    return summary


def summary_note(summary: dict) -> str:
    """The actor's line in the report's stage table."""
    sec = summary.get("seconds") or 0.0
    if not sec:
        return ""
    return f"{summary['steps']} steps, {summary['actions'] * summary.get('epochs', 1) / sec:.0f} actions/s"
