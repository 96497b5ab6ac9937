"""Packed rows without padding waste: block-diagonal examples and shared-prefix state/action groups.

One packed row holds several *documents*. A document is either

* an **example** (critic training): its tokens attend causally to themselves only, positions restart at 0;
* a **state group** (actor training, ref log-probs, critic scoring): the state's tokens once, then each of
  its actions; an action attends to the state and causally to itself (never to a sibling action), and its
  positions continue from the state's length. ``n`` actions of length ``L_a`` on a state of length ``L_s``
  cost ``L_s + n * L_a`` tokens instead of ``n * (L_s + L_a)``.

The attention rule, for query ``i`` and key ``j`` of one row::

    allowed(i, j) = j <= i  and  doc[i] == doc[j]  and  (part[j] == -1  or  part[j] == part[i])

(``part`` is -1 for example/state tokens, ``k >= 0`` for the k-th action of a state group). On CPU the rule
becomes a dense boolean mask (megatron local spec, ``True`` = masked); GPU kernels can evaluate it
blockwise from ``doc``/``part``.

Two micro-batch layouts (``packing``, chosen by the fast-path switch, ``ResolvedPaths.packing``):

* ``"dense_mask"``: rows stacked ``[b, L]`` (padded to the longest) with a ``[b, 1, L, L]`` mask;
* ``"thd"``: the real tokens of every row concatenated into one ``[1, T]`` sequence (no padding at all) with
  ``PackedSeqParams`` (``cu_seqlens`` over the documents; positions restart per document). Examples only:
  a shared-prefix document (actions attending to their state) is not a set of independent causal
  sequences, so THD cannot express it; those rows keep the dense mask (or flex_attention).

Next-token targets: the log-prob of an action's first token comes from the hidden state of the **last
state token** (shared by all actions of the state); later tokens from the previous token of the same
action. :class:`PackedRow` records, per action, the row positions whose hidden states predict each of its
tokens (``src``) and the token ids predicted (``tgt``), so a log-prob kernel can gather exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class ActionSpan:
    """Where one action lives in a row: its tokens ``[start, end)``, and its target gather indices."""

    key: object            # caller's id of the action
    start: int
    end: int
    src: list[int]         # row positions whose hidden states predict the action's tokens
    tgt: list[int]         # the token ids predicted (the action's tokens)


@dataclass
class DocSpan:
    key: object
    start: int
    end: int               # end of the whole document (state + actions)
    state_end: int         # end of the state (== end for an example)
    actions: list[ActionSpan] = field(default_factory=list)


@dataclass
class PackedRow:
    """One packed row: ``input_ids``/``position_ids``/``doc``/``part`` are ``[L]`` int64."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc: torch.Tensor
    part: torch.Tensor
    docs: list[DocSpan]

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    def attention_mask(self, length: int | None = None) -> torch.Tensor:
        """``[L, L]`` bool, True = masked (megatron convention); padded to ``length`` (pads see themselves)."""
        L = len(self)
        n = length or L
        doc = torch.full((n,), -2, dtype=torch.long)
        part = torch.full((n,), -1, dtype=torch.long)
        doc[:L], part[:L] = self.doc, self.part
        i = torch.arange(n)
        causal = i[None, :] <= i[:, None]
        same_doc = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
        vis = (part[None, :] == -1) | (part[None, :] == part[:, None])
        allowed = causal & same_doc & vis
        allowed |= torch.eye(n, dtype=torch.bool)  # padding tokens attend to themselves (no NaN rows)
        return ~allowed


class RowBuilder:
    """Builds one :class:`PackedRow` document by document."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.doc: list[int] = []
        self.part: list[int] = []
        self.docs: list[DocSpan] = []

    def __len__(self) -> int:
        return len(self.ids)

    def _extend(self, toks: Sequence[int], pos0: int, part: int) -> int:
        start = len(self.ids)
        d = len(self.docs)
        self.ids.extend(int(t) for t in toks)
        self.pos.extend(range(pos0, pos0 + len(toks)))
        self.doc.extend([d] * len(toks))
        self.part.extend([part] * len(toks))
        return start

    def add_example(self, tokens: Sequence[int], key: object = None) -> DocSpan:
        """An independent causal sequence (positions from 0)."""
        if len(tokens) == 0:
            raise ValueError("empty example")
        start = self._extend(tokens, 0, -1)
        span = DocSpan(key, start, len(self.ids), len(self.ids))
        self.docs.append(span)
        return span

    def add_state(self, state: Sequence[int], actions: Sequence[Sequence[int]], keys: Sequence[object] | None = None,
                  key: object = None) -> DocSpan:
        """A state once, then each action attending to the state and itself (positions continue)."""
        if len(state) == 0:
            raise ValueError("empty state")
        keys = list(keys) if keys is not None else list(range(len(actions)))
        start = self._extend(state, 0, -1)
        state_end = len(self.ids)
        last_state = state_end - 1
        spans = []
        for k, (a, akey) in enumerate(zip(actions, keys)):
            if len(a) == 0:
                raise ValueError(f"empty action {akey!r}")
            a_start = self._extend(a, len(state), k)
            src = [last_state] + list(range(a_start, a_start + len(a) - 1))
            spans.append(ActionSpan(akey, a_start, a_start + len(a), src, [int(t) for t in a]))
        span = DocSpan(key, start, len(self.ids), state_end, spans)
        self.docs.append(span)
        return span

    def build(self) -> PackedRow:
        return PackedRow(torch.tensor(self.ids, dtype=torch.long), torch.tensor(self.pos, dtype=torch.long),
                         torch.tensor(self.doc, dtype=torch.long), torch.tensor(self.part, dtype=torch.long),
                         self.docs)


def collate(rows: Sequence[PackedRow], pad_id: int = 0, length: int | None = None) -> dict:
    """Stack rows into a micro-batch padded to ``length`` (default: longest row).

    Returns ``input_ids``/``position_ids`` ``[b, L]`` int64, ``attention_mask`` ``[b, 1, L, L]`` bool
    (True = masked) and ``lengths`` ``[b]``.
    """
    L = length or max(len(r) for r in rows)
    b = len(rows)
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    pos = torch.zeros((b, L), dtype=torch.long)
    mask = torch.empty((b, 1, L, L), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r)
        if n > L:
            raise ValueError(f"row of {n} tokens exceeds length {L}")
        ids[i, :n], pos[i, :n] = r.input_ids, r.position_ids
        mask[i, 0] = r.attention_mask(L)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask,
            "lengths": torch.tensor([len(r) for r in rows])}


PACKINGS = ("dense_mask", "thd")


def thd_cu_seqlens(doc: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` int32 ``[n_docs + 1]`` of a block-diagonal row from its per-token document ids ``[L]``
    (documents contiguous, padding = -2 ignored): what ``PackedSeqParams(qkv_format="thd")`` takes."""
    real = doc[doc >= 0]
    if real.numel() == 0:
        return torch.zeros(1, dtype=torch.int32)
    change = torch.nonzero(real[1:] != real[:-1]).flatten() + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), change, torch.tensor([real.numel()])])
    return bounds.to(torch.int32)


def thd_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions int64 ``[T]`` of a THD pack: ``0..len-1`` in every document delimited by ``cu_seqlens``
    ``[n_docs + 1]`` (what megatron's ``cu_seqlens`` RoPE uses)."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    return torch.arange(int(cu[-1]), device=cu.device) - starts


def thd_packed_seq_params(cu_seqlens: torch.Tensor):
    """megatron ``PackedSeqParams(qkv_format="thd")`` for self-attention over the documents delimited by
    ``cu_seqlens`` int32 ``[n_docs + 1]`` (see :func:`thd_cu_seqlens`; Transformer Engine attention on GPU,
    :class:`ThdCoreAttention` on CPU)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


def collate_thd(rows: Sequence[PackedRow]) -> dict:
    """Concatenate the real tokens of ``rows`` into one THD sequence of ``T = sum(len(row))`` tokens.

    Returns ``input_ids``/``position_ids`` ``[1, T]`` int64 (positions restart at 0 per document),
    ``attention_mask`` None, ``packed_seq_params`` (megatron ``PackedSeqParams``, ``qkv_format="thd"``),
    ``cu_seqlens`` ``[n_docs + 1]`` int32, ``max_seqlen`` int, ``lengths`` ``[b]`` and ``row_offsets``
    ``[b]`` (where each row starts in ``[T]``). Raises ValueError for a shared-prefix row.
    """
    if not rows:
        raise ValueError("collate_thd needs at least one row")
    docs, ndoc = [], 0
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"row {i} is empty")
        if bool((r.part != -1).any()):
            raise ValueError(f"row {i} holds a shared-prefix document (actions attending to their state): THD "
                             f"packs only independent causal examples; use packing='dense_mask' for it")
        docs.append(r.doc + ndoc)                   # document ids unique across the rows
        ndoc += int(r.doc.max()) + 1
    cu = thd_cu_seqlens(torch.cat(docs))
    pos = torch.cat([r.position_ids for r in rows])
    if not torch.equal(pos, thd_positions(cu)):
        raise ValueError("THD rows need positions restarting at 0 in every document (RoPE follows cu_seqlens)")
    lengths = torch.tensor([len(r) for r in rows])
    psp = thd_packed_seq_params(cu)
    return {"input_ids": torch.cat([r.input_ids for r in rows])[None], "position_ids": pos[None],
            "attention_mask": None, "packed_seq_params": psp, "cu_seqlens": cu, "max_seqlen": psp.max_seqlen_q,
            "lengths": lengths, "row_offsets": torch.cumsum(lengths, 0) - lengths}


_ROW_POSITION_FIELDS = ("label_index", "src")      # positions in a row: shifted by the row's start
_LONG_FIELDS = ("label_index", "src", "tgt", "seg")
_FLOAT_FIELDS = ("targets", "advantages", "ref_logp")


def batch_rows(rows: Sequence[tuple[PackedRow, dict]], rows_per_microbatch: int, pad_id: int,
               packing: str = "dense_mask") -> list[dict]:
    """Group packed rows ``rows_per_microbatch`` at a time into micro-batches: ``[b, L]`` rows with a dense
    mask (:func:`collate`), or with ``packing="thd"`` one padding-free ``[1, T]`` sequence
    (:func:`collate_thd`).

    Each row comes with its extras (python lists): row positions (``label_index``, ``src``) are turned into
    flat indices into ``[b * L]`` (THD: into ``[T]``); ``seg`` (action index within the row) is renumbered
    across the rows (``num_segments`` gives a row's count); everything else is concatenated in row order.
    Several short rows per micro-batch keep the dense CPU attention mask small (``b * L^2`` instead of
    ``(b * L)^2``).
    """
    if rows_per_microbatch < 1:
        raise ValueError(f"rows_per_microbatch must be >= 1, got {rows_per_microbatch}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    mbs = []
    for c in range(0, len(rows), rows_per_microbatch):
        chunk = rows[c:c + rows_per_microbatch]
        if packing == "thd":
            batch = collate_thd([r for r, _ in chunk])
            starts = batch["row_offsets"].tolist()
        else:
            L = max(len(r) for r, _ in chunk)
            batch = collate([r for r, _ in chunk], pad_id=pad_id, length=L)
            starts = [i * L for i in range(len(chunk))]
        merged: dict = {}
        nseg = 0
        for i, (_, ex) in enumerate(chunk):
            for k, v in ex.items():
                if k == "num_segments":
                    continue
                if k in _ROW_POSITION_FIELDS:
                    v = [x + starts[i] for x in v]
                elif k == "seg":
                    v = [x + nseg for x in v]
                merged.setdefault(k, []).extend(v)
            nseg += ex.get("num_segments", 0)
        for k, v in merged.items():
            if k in _LONG_FIELDS:
                merged[k] = torch.tensor(v, dtype=torch.long)
            elif k in _FLOAT_FIELDS:
                merged[k] = torch.tensor(v, dtype=torch.float32)
        batch.update(merged)
        mbs.append(batch)
    return mbs


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bin-pack item indices into bins of at most ``budget`` tokens (first-fit decreasing).

    Deterministic (ties broken by index). An item longer than the budget raises ValueError.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"item {i} has {n} tokens, more than the packing budget {budget}")
        for b, f in enumerate(free):
            if n <= f:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(budget - n)
    return [sorted(b) for b in bins]


def batch_packing(batch: dict) -> str:
    """The layout of a micro-batch: ``"thd"`` (it carries ``packed_seq_params``) or ``"dense_mask"``."""
    return "thd" if batch.get("packed_seq_params") is not None else "dense_mask"


def empty_batch(pad_id: int, packing: str = "dense_mask") -> dict:
    """A one-token row carrying no labels and no actions: evens out micro-batch counts across
    data-parallel ranks (it contributes nothing to any loss or output)."""
    rb = RowBuilder()
    rb.add_example([pad_id])
    batch = collate_thd([rb.build()]) if packing == "thd" else collate([rb.build()], pad_id=pad_id)
    z = torch.zeros(0, dtype=torch.long)
    batch.update(label_index=z, targets=torch.zeros(0), example_index=[],
                 src=z, tgt=z, seg=z, action_keys=[], advantages=torch.zeros(0), ref_logp=torch.zeros(0))
    return batch


def dp_share(mbs: Sequence[dict], pad_id: int) -> list[dict]:
    """This data-parallel rank's micro-batches (round robin: global index ``i * dp + rank``), padded with
    :func:`empty_batch` (in the micro-batches' layout) so every DP rank runs the same number of micro-batches."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = max(1, -(-len(mbs) // dp))
    mine = list(mbs[r::dp])
    packing = batch_packing(mbs[0]) if mbs else "dense_mask"
    return mine + [empty_batch(pad_id, packing) for _ in range(per - len(mine))]
