"""Critic examples from the ``mc`` stage output, and their packing into rows.

One **solution example** = prompt + one whole kept solution; its targets are the MC values of its step
prefixes, read at the last token of each prefix (the prompt's last token for the empty prefix s_0, the
step's last token — the delimiter — for s_k). One forward pass trains every state of the solution.

Optional **completion examples** (``use_completions``; ../shared/notes/dapo-toy-findings.md: the extra
*distinct* labelled prefixes are what made a small critic learn): state + one MC completion, labelled at
every step end inside the completion with that completion's single-sample verified reward.

Targets are float32 and never rounded (an MC value 7/16 = 0.4375 stays 0.4375).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dapo_mcore.data.shards import iter_records
from dapo_mcore.packing import RowBuilder, batch_rows, first_fit_decreasing


@dataclass
class CriticExample:
    """Token ids and the (position, target) labels of one sequence; positions index ``tokens``."""

    problem_id: str
    tokens: list[int]
    label_pos: list[int]
    targets: list[float]
    kind: str = "solution"      # solution | completion

    def __len__(self) -> int:
        return len(self.tokens)


def _step_ends(prompt_len: int, steps: Sequence[Sequence[int]]) -> list[int]:
    ends, n = [prompt_len - 1], prompt_len
    for s in steps:
        n += len(s)
        ends.append(n - 1)
    return ends


def solution_examples(records: Iterable[dict]) -> list[CriticExample]:
    """One example per kept solution, labelled with the MC value of each of its prefixes."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_problem[r["problem_id"]].append(r)
    out = []
    for pid in sorted(by_problem):
        recs = by_problem[pid]
        # solution index -> {num_steps: record}
        per_sol: dict[int, dict[int, dict]] = defaultdict(dict)
        for r in recs:
            for sol, k in r["sources"]:
                per_sol[int(sol)][int(k)] = r
        for sol in sorted(per_sol):
            prefixes = per_sol[sol]
            full = prefixes[max(prefixes)]
            prompt = list(full["prompt_ids"])
            steps = [list(s) for s in full["step_ids"]]
            ends = _step_ends(len(prompt), steps)
            pos, tgt = [], []
            for k in sorted(prefixes):
                pos.append(ends[k])
                tgt.append(float(prefixes[k]["value"]))
            out.append(CriticExample(pid, prompt + [t for s in steps for t in s], pos, tgt, "solution"))
    return out


def completion_examples(records: Iterable[dict], delimiter_ids: Sequence[int], eos_id: int | None) -> list[CriticExample]:
    """State + completion, labelled at each step end inside the completion with its verified reward.

    A step end is a token equal to one of ``delimiter_ids`` (the delimiter's token ids) or the last token
    of the completion (``eos_id`` itself is dropped: its position would carry no new step).
    """
    delims = set(int(t) for t in delimiter_ids)
    out = []
    for r in records:
        state = list(r["prompt_ids"]) + [t for s in r["step_ids"] for t in s]
        for c in r.get("completions") or []:
            comp = [int(t) for t in c["output_ids"]]
            if eos_id is not None and comp and comp[-1] == eos_id:
                comp = comp[:-1]
            if not comp:
                continue
            pos = [len(state) + i for i, t in enumerate(comp) if t in delims]
            last = len(state) + len(comp) - 1
            if not pos or pos[-1] != last:
                pos.append(last)
            out.append(CriticExample(r["problem_id"], state + comp, pos, [float(c["reward"])] * len(pos),
                                     "completion"))
    return out


def is_heldout(problem_id: str, heldout_fraction: float, seed: int) -> bool:
    """Whether a problem is on the critic's held-out side (a seeded hash of its id)."""
    h = int(hashlib.sha1(f"{seed}:{problem_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < heldout_fraction


def split_by_problem(examples: Sequence[CriticExample], heldout_fraction: float, seed: int):
    """Held-out split of *problems* (never of states): a problem's examples all land on one side."""
    train = [e for e in examples if not is_heldout(e.problem_id, heldout_fraction, seed)]
    val = [e for e in examples if is_heldout(e.problem_id, heldout_fraction, seed)]
    return train, val


def truncate(ex: CriticExample, max_len: int) -> CriticExample | None:
    """Drop tokens past ``max_len`` and the labels they carried; None if no label survives."""
    if len(ex) <= max_len:
        return ex
    keep = [(p, t) for p, t in zip(ex.label_pos, ex.targets) if p < max_len]
    if not keep:
        return None
    return CriticExample(ex.problem_id, ex.tokens[:max_len], [p for p, _ in keep], [t for _, t in keep], ex.kind)


def pack_examples(examples: Sequence[CriticExample], token_budget: int, pad_id: int,
                  rows_per_microbatch: int = 1, packing: str = "dense_mask") -> list[dict]:
    """FFD-pack examples into rows of at most ``token_budget`` tokens, ``rows_per_microbatch`` rows per
    micro-batch.

    Each micro-batch (``packing="dense_mask"``): ``input_ids``/``position_ids`` ``[b, L]``,
    ``attention_mask`` ``[b, 1, L, L]`` (block-diagonal, causal), ``label_index`` ``[n]`` int64 (flat index
    into ``[b * L]``), ``targets`` ``[n]`` float32, ``example_index`` (indices into ``examples``, in label
    order). ``packing="thd"``: ``[1, T]`` with no padding, ``packed_seq_params`` and no mask, ``label_index``
    into ``[T]`` (:func:`dapo_mcore.packing.collate_thd`).
    """
    rows = []
    for b in first_fit_decreasing([len(e) for e in examples], token_budget):
        rb = RowBuilder()
        idx, tgt = [], []
        for i in b:
            span = rb.add_example(examples[i].tokens)
            idx += [span.start + p for p in examples[i].label_pos]
            tgt += examples[i].targets
        rows.append((rb.build(), {"label_index": idx, "targets": tgt, "example_index": list(b)}))
    return batch_rows(rows, rows_per_microbatch, pad_id, packing)


def read_mc(mc_dir: str | Path) -> list[dict]:
    return list(iter_records(mc_dir))
