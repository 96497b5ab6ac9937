"""Value-model scoring: V(s) and V(s ⊕ a_i) for many states, state encoded once per row (the critic's
held-out predictions and the advantage stage's action values).

Groups (a state and its candidate actions) are packed with the shared-prefix layout of
:mod:`dapo_mcore.packing` (each action attends to its state and itself; positions continue from the
state's length) into rows of at most ``token_budget`` tokens, first-fit decreasing; rows are spread over
data-parallel ranks and run through the pipeline forward-only. ``V(s ⊕ a_i)`` is read at the action's
last token, ``V(s)`` at the state's last token. Shared-prefix rows cannot be THD (actions attend to their
state, not only to themselves), so scoring always uses the dense mask / flex_attention, whatever
``ResolvedPaths.packing`` says; :func:`value_collect_step` also serves THD batches (critic ``predict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dapo_mcore.packing import RowBuilder, batch_rows, first_fit_decreasing
from dapo_mcore.training.trainer import collect_per_microbatch


@dataclass
class ScoreGroup:
    """One state (token ids) and its actions (token ids each)."""

    state: list[int]
    actions: list[list[int]]

    def cost(self) -> int:
        return len(self.state) + sum(len(a) for a in self.actions)


def pack_groups(groups: Sequence[ScoreGroup], token_budget: int, pad_id: int, rows_per_microbatch: int = 1) -> list[dict]:
    """Micro-batches with ``label_index`` = [V(s), V(s⊕a_1), ...] per group in bin order (flat indices), and
    ``example_index`` = the groups in the micro-batch."""
    rows = []
    for b in first_fit_decreasing([g.cost() for g in groups], token_budget):
        rb = RowBuilder()
        idx = []
        for gi in b:
            span = rb.add_state(groups[gi].state, groups[gi].actions)
            idx.append(span.state_end - 1)
            idx += [a.end - 1 for a in span.actions]
        rows.append((rb.build(), {"label_index": idx, "targets": [0.0] * len(idx), "example_index": list(b)}))
    return batch_rows(rows, rows_per_microbatch, pad_id)


def value_collect_step(model, batch: dict):
    """Forward-only step: sigmoid values at ``label_index`` in the logs."""
    out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                packed_seq_params=batch.get("packed_seq_params"))

    def loss_fn(o):
        v = torch.sigmoid(o.float().reshape(-1)[batch["label_index"]])
        return o.sum() * 0.0, torch.tensor(0, dtype=torch.int), {"values": v}

    return out, loss_fn


def values_by_example(chunks: list, mbs: list[dict], sizes: Sequence[int], pad_id: int) -> list[list[float]]:
    """Run ``mbs`` forward-only over DP x PP; return, per example (``example_index``), its values in
    label order (``sizes[i]`` labels for example i). The same on every rank."""
    res: dict[int, list[float]] = {}
    for mb, vals in zip(mbs, collect_per_microbatch(chunks, mbs, value_collect_step, "values", pad_id)):
        k = 0
        for i in mb["example_index"]:
            res[i] = vals[k:k + sizes[i]]
            k += sizes[i]
    return [res[i] for i in range(len(sizes))]


def score_groups(chunks: list, groups: Sequence[ScoreGroup], token_budget: int, pad_id: int,
                 rows_per_microbatch: int = 1) -> list[tuple[float, list[float]]]:
    """``[(V(s), [V(s⊕a_i) ...]) ...]`` in the order of ``groups``; the same list on every rank."""
    if not groups:
        return []
    vals = values_by_example(chunks, pack_groups(groups, token_budget, pad_id, rows_per_microbatch),
                             [1 + len(g.actions) for g in groups], pad_id)
    return [(v[0], v[1:]) for v in vals]
