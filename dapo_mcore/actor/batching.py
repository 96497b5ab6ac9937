"""State groups (a state and its actions) packed for the policy: DAPO training and reference log-probs.

A micro-batch is one or more packed rows (see :mod:`dapo_mcore.packing`) holding several state groups. With
``shared=True`` (the default) a state is encoded once and its actions follow it (shared-prefix mask);
``shared=False`` lays out every (state, action) pair as its own document, repeating the state: the
unshared baseline, numerically the same computation.

Per micro-batch, beside ``input_ids``/``position_ids``/``attention_mask`` ``[b, L]``/``[b, 1, L, L]``:

* ``src`` ``[N]`` int64 — flat positions in ``[b * L]`` whose hidden states predict the N action tokens,
* ``tgt`` ``[N]`` int64 — the action tokens,
* ``seg`` ``[N]`` int64 — the local action index ``[0, S)`` of each token,
* ``advantages`` ``[S]`` float32 and ``ref_logp`` ``[N]`` float32 (empty when not given),
* ``action_keys`` — ``(group index, action index)`` of each local action.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from dapo_mcore.models.gpt import unwrap_model
from dapo_mcore.packing import RowBuilder, batch_rows, first_fit_decreasing


@dataclass
class ActionGroup:
    """A state (token ids) and its actions; advantages / per-token ref log-probs for training."""

    state: list[int]
    actions: list[list[int]]
    advantages: Optional[list[float]] = None
    ref_logp: Optional[list[list[float]]] = None
    key: object = None
    meta: dict = field(default_factory=dict)

    def cost(self, shared: bool = True) -> int:
        la = sum(len(a) for a in self.actions)
        return len(self.state) + la if shared else len(self.state) * len(self.actions) + la


def _units(groups: Sequence[ActionGroup], shared: bool) -> list[tuple[int, list[int]]]:
    """Packing units: (group index, action indices). Shared: one unit per group; else one per action."""
    if shared:
        return [(gi, list(range(len(g.actions)))) for gi, g in enumerate(groups)]
    return [(gi, [ai]) for gi, g in enumerate(groups) for ai in range(len(g.actions))]


def pack_action_groups(groups: Sequence[ActionGroup], token_budget: int, pad_id: int, shared: bool = True,
                       rows_per_microbatch: int = 1) -> list[dict]:
    """FFD-pack groups (or, unshared, single (s, a) pairs) into rows, ``rows_per_microbatch`` rows per
    micro-batch (see module doc)."""
    units = _units(groups, shared)
    costs = [len(groups[gi].state) + sum(len(groups[gi].actions[a]) for a in ais) for gi, ais in units]
    rows = []
    for b in first_fit_decreasing(costs, token_budget):
        rb = RowBuilder()
        ex: dict = {"src": [], "tgt": [], "seg": [], "advantages": [], "ref_logp": [], "action_keys": []}
        for ui in b:
            gi, ais = units[ui]
            g = groups[gi]
            span = rb.add_state(g.state, [g.actions[a] for a in ais], keys=ais)
            for a_span in span.actions:
                ai = a_span.key
                ex["src"] += a_span.src
                ex["tgt"] += a_span.tgt
                ex["seg"] += [len(ex["action_keys"])] * len(a_span.tgt)
                if g.advantages is not None:
                    ex["advantages"].append(float(g.advantages[ai]))
                if g.ref_logp is not None:
                    ex["ref_logp"] += [float(x) for x in g.ref_logp[ai]]
                ex["action_keys"].append((gi, ai))
        ex["num_segments"] = len(ex["action_keys"])
        rows.append((rb.build(), ex))
    return batch_rows(rows, rows_per_microbatch, pad_id)


def token_logp(model, hidden: torch.Tensor, batch: dict, impl: Optional[str] = None) -> torch.Tensor:
    """log pi(tgt | prefix) ``[N]`` fp32 from the last-stage hidden states ``[1, L, H]`` via the fused op."""
    from megatron.core import parallel_state as ps

    from dapo_mcore.ops import fused_target_logprob

    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["src"])
    w = unwrap_model(model).output_weight()
    tp = ps.get_tensor_model_parallel_world_size()
    return fused_target_logprob(h, w.to(h.dtype), batch["tgt"], ps.get_tensor_model_parallel_group() if tp > 1 else None,
                                impl=impl)


def logp_collect_step(model, batch: dict):
    """Forward-only step: per-token log-probs of the packed actions, in the logs as ``logp`` ``[N]``."""
    hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden")

    def loss_fn(h):
        lp = token_logp(model, h, batch) if batch["tgt"].numel() else torch.zeros(0)
        return h.sum() * 0.0, torch.tensor(0, dtype=torch.int), {"logp": lp.detach()}

    return hidden, loss_fn


def dapo_forward_step(beta: float, impl: Optional[str] = None):
    """Training step factory: loss sum = ½ Σ_actions (A/β − Σ_tokens(logp − ref_logp))², count = #actions.

    Extra sums logged per action: ``abs_log_ratio``, ``kl_k3`` (estimate of KL(π_ref‖π_θ) on the
    reference's own actions: e^ρ − 1 − ρ), ``sign_agree`` (log-ratio moved with the sign of A; A = 0
    counts as agreement only when ρ = 0).
    """
    from dapo_mcore.ops import dapo_loss
    from dapo_mcore.training.trainer import make_loss_fn

    def step(model, batch):
        hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden")

        def compute(h):
            n_act = len(batch["action_keys"])
            lp = token_logp(model, h, batch, impl)
            if n_act == 0:
                # A DP-padding micro-batch: zero loss, but through the fused op (T=0), so the output weight
                # still receives a gradient and megatron DDP's grad-ready hook fires for it (with
                # overlap_grad_reduce every param must report ready each step).
                zero = h.sum() * 0.0 + lp.sum() * 0.0
                return zero, 0, {"abs_log_ratio": 0.0, "kl_k3": 0.0, "sign_agree": 0.0}
            out = dapo_loss(lp, batch["ref_logp"].to(lp.dtype), batch["seg"], batch["advantages"].to(lp.dtype), beta,
                            normalizer=1.0, impl=impl)
            rho, adv = out.log_ratio.double(), batch["advantages"].double()
            return out.loss, n_act, {"abs_log_ratio": rho.abs().sum(), "kl_k3": (torch.exp(rho) - 1 - rho).sum(),
                                     "sign_agree": (torch.sign(rho) == torch.sign(adv)).double().sum()}

        return hidden, make_loss_fn(compute)

    return step
