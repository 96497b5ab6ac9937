"""Per-token log-probs of packed state groups under the policy: what actor training, the advantage
stage's reference log-probs and SFT share.

:func:`token_logp` reads log π(tgt | prefix) from the last-stage hidden states through the fused op (never
a [tokens x vocab] tensor). State groups (a state and its actions) are packed for it by
:func:`pack_action_groups`; :func:`reference_logprobs` runs them forward-only over DP x PP.

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
from dapo_mcore.ops import fused_target_logprob
from dapo_mcore.packing import RowBuilder, batch_rows, first_fit_decreasing
from dapo_mcore.training.trainer import collect_per_microbatch


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


def output_inputs(model, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[object]]:
    """``(h [N, H], w [V_local, H], tp_group)``: the hidden states of the packed action tokens (the rows
    ``batch["src"]`` of the last-stage hidden states ``[1, L, H]``), the output weight (this rank's vocab
    shard, in h's dtype: the parameter itself when the dtypes match, so megatron's ``main_grad`` fusion
    applies) and the TP group (None at TP=1) — what the fused ops take."""
    from megatron.core import parallel_state as ps

    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["src"])
    w = unwrap_model(model).output_weight()
    tp = ps.get_tensor_model_parallel_world_size()
    return h, w.to(h.dtype), ps.get_tensor_model_parallel_group() if tp > 1 else None


def token_logp(model, hidden: torch.Tensor, batch: dict, impl: Optional[str] = None) -> torch.Tensor:
    """log pi(tgt | prefix) ``[N]`` fp32 from the last-stage hidden states ``[1, L, H]`` via the fused op."""
    h, w, tp_group = output_inputs(model, hidden, batch)
    return fused_target_logprob(h, w, batch["tgt"], tp_group, impl=impl)


def logp_collect_step(model, batch: dict):
    """Forward-only step: per-token log-probs of the packed actions, in the logs as ``logp`` ``[N]``."""
    hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden")

    def loss_fn(h):
        lp = token_logp(model, h, batch) if batch["tgt"].numel() else torch.zeros(0)
        return h.sum() * 0.0, torch.tensor(0, dtype=torch.int), {"logp": lp.detach()}

    return hidden, loss_fn


def reference_logprobs(chunks: list, groups: Sequence[ActionGroup], token_budget: int, pad_id: int,
                       rows_per_microbatch: int = 1) -> list[list[list[float]]]:
    """Per group, per action, the per-token log π(a | s) (fused op, shared-prefix rows, DP x PP); the same
    lists on every rank."""
    mbs = pack_action_groups(groups, token_budget, pad_id, shared=True, rows_per_microbatch=rows_per_microbatch)
    res: dict[tuple, list[float]] = {}
    for mb, lp in zip(mbs, collect_per_microbatch(chunks, mbs, logp_collect_step, "logp", pad_id)):
        seg = mb["seg"].tolist()
        for local, key in enumerate(mb["action_keys"]):
            res[key] = [x for x, s in zip(lp, seg) if s == local]
    return [[res[(gi, ai)] for ai in range(len(g.actions))] for gi, g in enumerate(groups)]
