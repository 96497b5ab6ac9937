"""Critic scoring service: V(s) and V(s ⊕ a_i) for many states, state encoded once per row.

Groups (a state and its candidate actions) are packed with the shared-prefix layout of
:mod:`dapo_mcore.packing` (each action attends to its state and itself; positions continue from the
state's length) into rows of at most ``token_budget`` tokens, first-fit decreasing; rows are spread over
data-parallel ranks and run through the pipeline forward-only. ``V(s ⊕ a_i)`` is read at the action's
last token, ``V(s)`` at the state's last token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dapo_mcore.packing import RowBuilder, collate, first_fit_decreasing


@dataclass
class ScoreGroup:
    """One state (token ids) and its actions (token ids each)."""

    state: list[int]
    actions: list[list[int]]

    def cost(self) -> int:
        return len(self.state) + sum(len(a) for a in self.actions)


def pack_groups(groups: Sequence[ScoreGroup], token_budget: int, pad_id: int) -> list[dict]:
    """Micro-batches (one row each) with ``label_index`` = [V(s), V(s⊕a_1), ...] per group in bin order,
    and ``group_index`` = the groups in the row."""
    bins = first_fit_decreasing([g.cost() for g in groups], token_budget)
    mbs = []
    for b in bins:
        rb = RowBuilder()
        idx = []
        for gi in b:
            span = rb.add_state(groups[gi].state, groups[gi].actions)
            idx.append(span.state_end - 1)
            idx += [a.end - 1 for a in span.actions]
        batch = collate([rb.build()], pad_id=pad_id)
        batch["label_index"] = torch.tensor(idx, dtype=torch.long)
        batch["targets"] = torch.zeros(len(idx))
        batch["example_index"] = list(b)
        mbs.append(batch)
    return mbs


def value_collect_step(model, batch: dict):
    """Forward-only step: sigmoid values at ``label_index`` in the logs."""
    out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])

    def loss_fn(o):
        v = torch.sigmoid(o.float().reshape(-1)[batch["label_index"]])
        return o.sum() * 0.0, torch.tensor(0, dtype=torch.int), {"values": v}

    return out, loss_fn


def dummy_microbatch(pad_id: int) -> dict:
    """A one-token row with no labels (evens out micro-batch counts across data-parallel ranks)."""
    rb = RowBuilder()
    rb.add_example([pad_id])
    batch = collate([rb.build()], pad_id=pad_id)
    batch["label_index"] = torch.zeros(0, dtype=torch.long)
    batch["targets"] = torch.zeros(0, dtype=torch.float32)
    batch["example_index"] = []
    return batch


def dp_share(mbs: list[dict], pad_id: int) -> list[dict]:
    """This DP rank's micro-batches (round robin: global index ``i * dp + rank``), padded with label-free
    one-token rows so every DP rank runs the same number of micro-batches."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = max(1, -(-len(mbs) // dp))
    mine = list(mbs[r::dp])
    return mine + [dummy_microbatch(pad_id) for _ in range(per - len(mine))]


def values_by_example(chunks: list, mbs: list[dict], sizes: Sequence[int], pad_id: int) -> list[list[float]]:
    """Run ``mbs`` forward-only over DP x PP; return, per example (``example_index``), its values in
    label order (``sizes[i]`` labels for example i). The same on every rank."""
    from megatron.core import parallel_state as ps

    from dapo_mcore.training.trainer import forward_collect

    outs = forward_collect(chunks, dp_share(mbs, pad_id), value_collect_step)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {(i * dp + r): o["values"].tolist() for i, o in enumerate(outs) if i * dp + r < len(mbs)}
    parts: list = [None] * dp
    torch.distributed.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    res: dict[int, list[float]] = {}
    for part in parts:
        for mi, vals in part.items():
            k = 0
            for i in mbs[mi]["example_index"]:
                res[i] = vals[k:k + sizes[i]]
                k += sizes[i]
    return [res[i] for i in range(len(sizes))]


def score_groups(chunks: list, groups: Sequence[ScoreGroup], token_budget: int, pad_id: int) -> list[tuple[float, list[float]]]:
    """``[(V(s), [V(s⊕a_i) ...]) ...]`` in the order of ``groups``; the same list on every rank."""
    if not groups:
        return []
    vals = values_by_example(chunks, pack_groups(groups, token_budget, pad_id),
                             [1 + len(g.actions) for g in groups], pad_id)
    return [(v[0], v[1:]) for v in vals]
