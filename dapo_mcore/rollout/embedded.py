"""Embedded generation engine: an in-process transformers model that computes each prompt prefix's
KV once, shares it across the ``n`` samples of a request and (radix cache) across requests and
calls, and decodes many requests as one batch.

A batch runs in two phases:

1. **Prefix KV** (all prompt tokens but the last), by :meth:`EmbeddedEngine._prefill`, whose
   result is a pure function of the tokens: bit-identical whatever the batch mates, padding or
   split into runs (measured on CPU fp32 with 1 and 2 threads; tested). What it takes: every
   row's tokens sit at KV columns equal to their positions (a "ragged" cache: each row appends
   at its own length; explicit 4D causal masks), attention runs on :func:`prefix_attention`, whose
   products all run on fixed ``_KV_BLOCK``-column KV blocks summed in order (SDPA's fused CPU kernel
   and even its math kernel sum over the whole KV width, and MKL picks another summation for some
   widths: measured on an AVX2-only AMD EPYC, where ``p @ v`` with zero-padded columns changed its
   bits at widths 224-288), and the query columns of a pass are padded to a multiple of
   ``_Q_ALIGN`` (small GEMMs take other MKL kernels; vectorised elementwise ops round a tensor's
   scalar tail differently). The three modes differ only in *what* they compute:
   ``prefix_reuse=False`` every sample's prefix; ``radix_cache_bytes=0`` each request's prefix
   once; radix cache (default) only the parts of the prefixes not stored yet (see below).
2. **Decode**: each sample's prefix KV is copied into preallocated buffers (left padded to the
   batch's longest prefix, no per-step ``torch.cat``), then every sample computes its last prompt
   token and its new tokens. Finished rows are compacted away in bulk. This phase is the same
   code on the same layout in every mode, so for the same calls outputs (ids and logprobs) are
   bit-identical with and without prefix reuse and with and without the radix cache. (Decode
   itself still depends on its batch's shape, as before: a request batched differently can
   differ in the last bits.)

**Radix cache** (:class:`~dapo_mcore.rollout.radix.RadixCache`, as SGLang's radix cache shares
the nested states of a solution): a tree mapping token prefixes to their KV. A batch inserts its
prefixes; the parts not stored become pending nodes, computed once each, in as few passes as the
tree's branching allows (a chain of nested prefixes, e.g. the states of one solution, is one row
of one pass). Unpinned leaves are evicted least recently used first once the stored KV exceeds
``radix_cache_bytes``.

``cached_tokens`` is reported per sample and is exact: prompt tokens whose KV the sample did not
compute. A prefix token computed in a call is charged once, to sample 0 of the first (shortest)
request of its batch that needed it; samples 1..n-1 report ``prompt_tokens - 1``. So
``sum(prompt_tokens - cached_tokens)`` over all samples is the prompt tokens the model really ran.
Without the radix cache a request's sample 0 reports 0. (SGLang, whose cache was filled by a
separate warm-up pass, reports ``prompt_tokens-1`` for all n samples of a fully cached prompt.)

Sampling is seeded per sample (:func:`~dapo_mcore.rollout.backend.sample_seed`): each row draws its
uniforms from its own ``torch.Generator``, so its tokens do not depend on which other rows share
the batch (given equal logits).
"""
from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dapo_mcore.rollout.backend import GenRequest, sample_seed
from dapo_mcore.rollout.radix import Node, RadixCache
from dapo_mcore.rollout.segment import TokenBytes

_Q_ALIGN = 32            # query columns of a prefix pass: a multiple of this (see module doc)
_Q_CHUNK = 512           # at most this many new tokens of a row per prefix pass
_KV_BLOCK = 128          # prefix_attention's fixed KV block (32 / 64 / 128 / 256 measured: 128 the fastest)
_Q_TILE = 128            # prefix_attention's query tile (KV blocks past a tile's last attended column are skipped)
_ATTN_BUDGET = 1 << 20   # attention scores per prefix pass (prefix_attention materialises them, and d/128 x as many for p @ v)


@dataclass
class EngineConfig:
    """``max_batch_rows``: sequences decoded together (a request's n samples are never split);
    ``max_context``: prompt + new tokens limit (default: the model's max_position_embeddings);
    ``compact_fraction``: drop finished rows from the batch once this fraction of it is idle;
    ``radix_cache_bytes``: bound of the cross-request prefix cache (KV bytes kept between batches;
    a running batch's own new prefixes are pinned on top of it), 0 = share a prefix only among the
    n samples of its request; needs ``prefix_reuse``."""

    model_path: str
    prefix_reuse: bool = True
    max_batch_rows: int = 256
    dtype: str = "float32"
    max_context: int | None = None
    compact_fraction: float = 0.25
    radix_cache_bytes: int = 1 << 30

    def __post_init__(self):
        if self.radix_cache_bytes < 0:
            raise ValueError(f"radix_cache_bytes must be >= 0, got {self.radix_cache_bytes}")


@dataclass
class EngineStats:
    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0        # sum over samples
    cached_tokens: int = 0        # sum over samples
    completion_tokens: int = 0
    forward_tokens: int = 0       # real (non-pad) tokens the model ran, prompt + decode
    idle_tokens: int = 0          # decode slots of already-finished rows awaiting compaction
    evicted_tokens: int = 0       # KV tokens evicted from the radix cache
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _seed_uniforms(seed: int | None, length: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return torch.rand(max(length, 1), generator=g, dtype=torch.float64)


@functools.cache
def _layer_classes():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """Decode cache layer over preallocated buffers ``kb``/``vb`` [R, H, capacity, D] whose first
        ``n`` positions hold the KV so far: ``update`` writes in place (no per-step ``torch.cat``)."""

        def __init__(self, kb: torch.Tensor, vb: torch.Tensor, n: int):
            super().__init__()
            self._kb, self._vb, self._n = kb, vb, n
            self.dtype, self.device, self.is_initialized = kb.dtype, kb.device, True
            self._views()

        def _views(self):
            self.keys, self.values = self._kb[:, :, :self._n], self._vb[:, :, :self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            q = key_states.shape[-2]
            if self._n + q > self._kb.shape[2]:  # grow (not expected: capacity covers max_new_tokens)
                extra = max(q, self._kb.shape[2] // 2)
                self._kb = torch.cat([self._kb, self._kb.new_zeros(self._kb.shape[:2] + (extra, self._kb.shape[3]))], 2)
                self._vb = torch.cat([self._vb, self._vb.new_zeros(self._vb.shape[:2] + (extra, self._vb.shape[3]))], 2)
            self._kb[:, :, self._n:self._n + q] = key_states
            self._vb[:, :, self._n:self._n + q] = value_states
            self._n += q
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            kb = self._kb.new_empty((len(indices),) + self._kb.shape[1:])
            vb = self._vb.new_empty((len(indices),) + self._vb.shape[1:])
            kb[:, :, :self._n] = self._kb[indices, :, :self._n]
            vb[:, :, :self._n] = self._vb[indices, :, :self._n]
            self._kb, self._vb = kb, vb
            self._views()

    class RaggedLayer(DynamicLayer):
        """Prefix-pass cache layer over ``kb``/``vb`` [B, H, W, D]: row b's KV occupies columns
        ``[0, base[b])`` and the pass writes its q new columns at ``[base[b], base[b] + q)``, so every
        token's KV column is its position. The pass's 4D mask says which columns are real."""

        def __init__(self, kb: torch.Tensor, vb: torch.Tensor, base: torch.Tensor):
            super().__init__()
            self._kb, self._vb, self._base = kb, vb, base
            self.dtype, self.device, self.is_initialized = kb.dtype, kb.device, True
            self._rows = torch.arange(kb.shape[0]).unsqueeze(1)
            self.keys, self.values = kb, vb

        def update(self, key_states, value_states, *args, **kwargs):
            if key_states.shape[1] != self._kb.shape[1] or key_states.shape[3] != self._kb.shape[3] \
                    or value_states.shape[1:] != key_states.shape[1:]:
                raise ValueError(f"KV of shape {tuple(key_states.shape)}/{tuple(value_states.shape)} per layer, "
                                 f"expected [B, {self._kb.shape[1]}, q, {self._kb.shape[3]}] for both (config)")
            cols = self._base.unsqueeze(1) + torch.arange(key_states.shape[2])
            self._kb[self._rows, :, cols] = key_states.transpose(1, 2)
            self._vb[self._rows, :, cols] = value_states.transpose(1, 2)
            return self._kb, self._vb

        def get_seq_length(self) -> int:
            return int(self._base.max())

    return BufferLayer, RaggedLayer


def _cache_of(layers: list):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = layers
    return cache


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row by inverse CDF with the row's uniform ``u``.

    logits [R, V] (any float dtype), temperature/top_p [R] float (temperature 0 = greedy),
    top_k [R] long (-1 = off), u [R] float64 in [0, 1). Returns [R] long.
    """
    R, V = logits.shape
    x = logits.float() / temperature.clamp_min(1e-6).unsqueeze(1)
    pick = torch.empty(R, dtype=torch.long)
    # rows with top-k/top-p sample in descending-probability order, the others in vocab order;
    # decided per row so a row's token never depends on its batch mates
    filt = ((top_k > 0) & (top_k < V)) | (top_p < 1)
    plain = (~filt).nonzero().squeeze(1)
    if len(plain):
        cdf = torch.softmax(x[plain], dim=-1).double().cumsum(-1)
        pick[plain] = torch.searchsorted(cdf, (u[plain] * cdf[:, -1]).unsqueeze(1), right=True).clamp_max(V - 1).squeeze(1)
    rows = filt.nonzero().squeeze(1)
    if len(rows):
        xs, order = x[rows].sort(dim=-1, descending=True)
        probs = torch.softmax(xs, dim=-1)
        k = torch.where(top_k[rows] > 0, top_k[rows], V).unsqueeze(1)
        keep = (torch.arange(V).unsqueeze(0) < k) & ((probs.cumsum(-1) - probs) < top_p[rows].unsqueeze(1))
        cdf = (probs * keep).double().cumsum(-1)
        j = torch.searchsorted(cdf, (u[rows] * cdf[:, -1]).unsqueeze(1), right=True).clamp_max(V - 1)
        pick[rows] = order.gather(1, j).squeeze(1)
    greedy = temperature <= 0
    if greedy.any():
        pick = torch.where(greedy, logits.argmax(-1), pick)
    return pick


def _round_up(n: int) -> int:
    return -(-n // _Q_ALIGN) * _Q_ALIGN


_PREFIX_ATTN = "dapo_prefix"  # the attention implementation of the prefix pass (registered on first use)


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention whose bits do not depend on the KV width (module doc): every product runs on fixed
    ``_KV_BLOCK``-column KV blocks and the blocks are summed in order (``cumsum``), so zero-probability
    columns past a row's context add exact zeros, and the KV blocks past the last column any query of a
    ``_Q_TILE``-query tile attends are skipped (they would add exactly those zeros: the causal half of a long
    pass). query [B, h, q, d], key/value [B, kv_heads, W, d], attention_mask bool [B, 1, q, W] (True: attend)
    -> ([B, q, h, d], None)."""
    B, h, q, d = query.shape
    kvh, W, blk = key.shape[1], key.shape[2], _KV_BLOCK
    rep = h // kvh
    pad = -(-W // blk) * blk - W
    if pad:
        key, value = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (key, value))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, pad), value=False)
    nb = (W + pad) // blk
    k, v = key.reshape(B, kvh, nb, blk, d), value.reshape(B, kvh, nb, blk, d)
    scale = scaling if scaling is not None else d ** -0.5
    seen = attention_mask.any(0).any(0).view(q, nb, blk).any(-1)                    # [q, nb]: block seen by query
    upto = (seen * torch.arange(1, nb + 1)).amax(1)                                 # [q]: 1 + its last seen block
    out = query.new_empty((B, q, h, d))
    for i0 in range(0, q, _Q_TILE):
        i1 = min(q, i0 + _Q_TILE)
        qt, n = i1 - i0, max(1, int(upto[i0:i1].max()))
        # GQA without copying KV: the rep query heads of a KV head (heads kv*rep .. kv*rep+rep-1) are one
        # rep*qt-row operand; every product is one [rep*qt, d] x [d, blk] / [rep*qt, blk] x [blk, d] GEMM
        sc = torch.matmul(query[:, :, i0:i1].reshape(B, kvh, 1, rep * qt, d), k[:, :, :n].transpose(-1, -2))
        sc.mul_(scale)                                                               # [B, kvh, n, rep*qt, blk]
        keep = attention_mask[:, :, i0:i1, :n * blk].reshape(B, 1, 1, qt, n, blk).permute(0, 1, 4, 2, 3, 5)
        sc.view(B, kvh, n, rep, qt, blk).masked_fill_(~keep, float("-inf"))
        sc.sub_(sc.amax(dim=(2, 4), keepdim=True)).exp_()                            # in place: no score copies
        denom = sc.sum(-1).cumsum(2)[:, :, -1]                                      # [B, kvh, rep*qt]
        o = torch.matmul(sc, v[:, :, :n]).cumsum(2)[:, :, -1] / denom.unsqueeze(-1)  # [B, kvh, rep*qt, d]
        out[:, i0:i1] = o.view(B, h, qt, d).transpose(1, 2)
    return out, None


def _register_prefix_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_PREFIX_ATTN, prefix_attention)


class EmbeddedEngine:
    """In-process generation backend (see module doc). Thread-safe (one batch at a time)."""

    def __init__(self, cfg: EngineConfig, model=None, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model_path)
        self.model = model or AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=getattr(torch, cfg.dtype))
        self.model.eval()
        # the KV-cache argument and output field: `cache` in recent transformers (5.24, 5.25: `past_key_values`
        # is its deprecated alias, removed in 5.40), `past_key_values` in older ones
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        mc = self.model.config
        impl = getattr(mc, "_attn_implementation", None)
        if impl != "sdpa":
            raise ValueError(f"{cfg.model_path}: the embedded engine needs attn_implementation='sdpa', the model has {impl!r}")
        kinds = set(getattr(mc, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"{cfg.model_path}: the embedded engine needs full-attention layers only (it places KV by "
                             f"position and masks explicitly), the model has {sorted(kinds)}")
        self.token_bytes = TokenBytes(self.tokenizer)
        eos = set()
        for src in (getattr(self.model, "generation_config", None), mc):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            eos |= set(e if isinstance(e, (list, tuple)) else ([e] if e is not None else []))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos, default=0)
        self.max_context = cfg.max_context or int(getattr(mc, "max_position_embeddings", 4096))
        # KV geometry [layers, 2, kv_heads, tokens, head_dim] of one sequence
        self._layers = int(mc.num_hidden_layers)
        self._heads = int(mc.num_attention_heads)
        self._kv_heads = int(getattr(mc, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(getattr(mc, "head_dim", None) or mc.hidden_size // self._heads)
        self._kv_dtype = next(self.model.parameters()).dtype
        self.kv_token_bytes = self._layers * 2 * self._kv_heads * self._head_dim * self._kv_dtype.itemsize
        self.radix = RadixCache(cfg.radix_cache_bytes) if cfg.prefix_reuse and cfg.radix_cache_bytes > 0 else None
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._rid = 0

    # -- public -------------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest]) -> list[list[dict[str, Any]]]:
        for r in requests:
            if len(r.input_ids) >= self.max_context:
                raise ValueError(f"request {r.rid!r}: prompt has {len(r.input_ids)} tokens, context is {self.max_context}")
            if max(r.input_ids) >= self.model.config.vocab_size or min(r.input_ids) < 0:
                raise ValueError(f"request {r.rid!r}: token id out of range [0, {self.model.config.vocab_size})")
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
        groups, cur, rows = [], [], 0
        for i in order:
            n = requests[i].params.n
            if cur and rows + n > self.cfg.max_batch_rows:
                groups.append(cur)
                cur, rows = [], 0
            cur.append(i)
            rows += n
        if cur:
            groups.append(cur)
        out: list[list[dict]] = [None] * len(requests)  # type: ignore[list-item]
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            for g in groups:
                for i, res in zip(g, self._run_group([requests[i] for i in g])):
                    out[i] = res
            self.stats.seconds += time.perf_counter() - t0
        return out

    def flush_cache(self) -> None:
        """Drop the radix cache (e.g. after the model's weights changed)."""
        with self._lock:
            if self.radix is not None:
                self.radix.clear()

    def close(self) -> None:
        pass

    # -- prefix KV ------------------------------------------------------------------------------
    def _prefill(self, pasts: list[list[torch.Tensor]], news: list[list[int]]) -> list[torch.Tensor]:
        """KV of the tokens ``news[b]`` (non-empty) following the context whose KV is ``pasts[b]``
        (chunks [layers, 2, kv_heads, n, head_dim], in order). Returns per row
        [layers, 2, kv_heads, len(news[b]), head_dim]. Runs in passes of at most ``_Q_CHUNK`` new
        tokens per row and ``_ATTN_BUDGET`` attention scores; the bits do not depend on the split."""
        ctx = [list(p) for p in pasts]
        clen = [sum(c.shape[3] for c in p) for p in pasts]
        out: list[list[torch.Tensor]] = [[] for _ in news]
        done = [0] * len(news)
        while todo := sorted((b for b in range(len(news)) if done[b] < len(news[b])), key=lambda b: clen[b]):
            takes = {b: news[b][done[b]:done[b] + _Q_CHUNK] for b in todo}
            batches, cur = [], []
            for b in todo:
                trial = cur + [b]
                q = _round_up(max(len(takes[x]) for x in trial))
                if cur and len(trial) * self._heads * q * (max(clen[x] for x in trial) + q) > _ATTN_BUDGET:
                    batches.append(cur)
                    trial = [b]
                cur = trial
            batches.append(cur)
            for sub in batches:
                for b, kv in zip(sub, self._prefill_pass([ctx[b] for b in sub], [takes[b] for b in sub])):
                    ctx[b].append(kv)
                    out[b].append(kv)
                    clen[b] += kv.shape[3]
                    done[b] += kv.shape[3]
        return [o[0] if len(o) == 1 else torch.cat(o, 3) for o in out]

    def _prefill_pass(self, ctx: list[list[torch.Tensor]], toks: list[list[int]]) -> list[torch.Tensor]:
        """One forward: row b = its context KV at columns [0, m_b), its tokens at [m_b, m_b + len),
        query columns right padded to a multiple of ``_Q_ALIGN``; :func:`prefix_attention` (module doc)."""
        B, L = len(toks), self._layers
        m = [sum(c.shape[3] for c in p) for p in ctx]
        e = torch.tensor([len(t) for t in toks])
        q = _round_up(int(e.max()))
        W = max(m) + q
        kv = torch.zeros((L, 2, B, self._kv_heads, W, self._head_dim), dtype=self._kv_dtype)
        for b, chunks in enumerate(ctx):
            a = 0
            for c in chunks:
                kv[:, :, b, :, a:a + c.shape[3]] = c
                a += c.shape[3]
        ids = torch.full((B, q), self.pad_id, dtype=torch.long)
        for b, t in enumerate(toks):
            ids[b, :len(t)] = torch.tensor(t)
        base = torch.tensor(m)
        pos = base.unsqueeze(1) + torch.arange(q)
        # query (b, i) sees columns <= its position, and only the real ones (pad queries: all real columns)
        mask = torch.arange(W).view(1, 1, W) <= torch.minimum(pos, (base + e - 1).unsqueeze(1)).unsqueeze(2)
        ragged = _layer_classes()[1]
        cache = _cache_of([ragged(kv[i, 0], kv[i, 1], base) for i in range(L)])
        _register_prefix_attention()
        cfg = self.model.config
        cfg._attn_implementation = _PREFIX_ATTN  # back to sdpa below: decode runs on SDPA
        try:
            self.model(input_ids=ids, attention_mask=mask.unsqueeze(1), position_ids=pos, use_cache=True,
                       logits_to_keep=1, **{self._cache_kw: cache})
        finally:
            cfg._attn_implementation = "sdpa"
        return [kv[:, :, b, :, m[b]:m[b] + len(toks[b])].contiguous() for b in range(B)]

    def _prefill_each(self, seqs: list[list[int]]) -> list[list[torch.Tensor]]:
        """KV chunks of each sequence from nothing ([] for an empty one)."""
        idx = [i for i, s in enumerate(seqs) if s]
        out: list[list[torch.Tensor]] = [[] for _ in seqs]
        for i, kv in zip(idx, self._prefill([[] for _ in idx], [seqs[i] for i in idx]) if idx else []):
            out[i] = [kv]
        return out

    def _radix_prefix(self, reqs: list[GenRequest]) -> tuple[list[list[torch.Tensor]], list[int], int]:
        """KV chunks of every request's prefix (all tokens but the last) from the radix cache, computing
        the parts not stored yet. Returns ``(chunks per request, new tokens per request, tokens run)``."""
        tree = self.radix
        ends: list[Node] = []
        new: list[int] = []
        ok = False
        try:
            for r in reqs:  # shortest first (generate sorts): a shared new part is charged to the shortest
                node, k = tree.insert(r.input_ids[:-1])
                ends.append(node)
                new.append(k)
            # room for this batch's new KV, from unpinned LRU leaves
            self.stats.evicted_tokens += tree.evict(max(0, tree.max_bytes - sum(new) * self.kv_token_bytes))
            fwd = self._fill_pending()
            chunks = [[n.kv for n in e.path()] for e in ends]
            ok = True
        finally:
            for e in ends:
                tree.release(e)
            if not ok:
                tree.discard_pending()
            self.stats.evicted_tokens += tree.evict()
        return chunks, new, fwd

    def _fill_pending(self) -> int:
        """Compute the KV of every pending radix node. One :meth:`_prefill` per wave: a wave takes each
        pending node whose parent is computed and extends it down its chain of single pending
        children (nested prefixes: one row); branches wait for the next wave. Returns tokens run."""
        tree = self.radix
        todo = tree.pending()
        fwd = 0
        while todo:
            chains = []
            for n in todo:
                if n.parent is tree.root or n.parent.kv is not None:
                    chain = [n]
                    while len(kids := [c for c in chain[-1].children.values() if c.kv is None]) == 1:
                        chain.append(kids[0])
                    chains.append(chain)
            toks = [[t for n in c for t in n.key] for c in chains]
            kvs = self._prefill([[p.kv for p in c[0].parent.path()] for c in chains], toks)
            for chain, kv in zip(chains, kvs):
                a = 0
                for n in chain:
                    tree.set_kv(n, kv[:, :, :, a:a + len(n.key)].contiguous())
                    a += len(n.key)
            fwd += sum(len(t) for t in toks)
            todo = [n for n in todo if n.kv is None]
        return fwd

    def _decode_cache(self, groups: list[tuple[list[torch.Tensor], int]], extra: int):
        """Decode cache and 2D mask [R, C]: for each ``(prefix KV chunks, rows)``, in order, ``rows``
        rows holding that prefix, left padded to the longest prefix C, ``extra`` free positions after."""
        lens = [sum(c.shape[3] for c in chunks) for chunks, _ in groups]
        C, R = max(lens), sum(n for _, n in groups)
        kv = torch.empty((self._layers, 2, R, self._kv_heads, C + extra, self._head_dim), dtype=self._kv_dtype)
        mask = torch.zeros((R, C), dtype=torch.long)
        r0 = 0
        for (chunks, n), ln in zip(groups, lens):
            a = C - ln
            mask[r0:r0 + n, a:] = 1
            kv[:, :, r0:r0 + n, :, :a] = 0     # masked, but must be finite (0 * nan = nan in attention)
            for c in chunks:
                kv[:, :, r0:r0 + n, :, a:a + c.shape[3]] = c.unsqueeze(2)
                a += c.shape[3]
            r0 += n
        buffer = _layer_classes()[0]
        return _cache_of([buffer(kv[i, 0], kv[i, 1], C) for i in range(self._layers)]), mask

    # -- decode ---------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        return out.logits[:, -1, :], getattr(out, self._cache_kw)

    def _run_group(self, reqs: list[GenRequest]) -> list[list[dict]]:
        rows = [(ri, j) for ri, r in enumerate(reqs) for j in range(r.params.n)]
        R = len(rows)
        plen = torch.tensor([len(reqs[ri].input_ids) for ri, _ in rows])
        prm = [reqs[ri].params for ri, _ in rows]
        max_new = [min(p.max_new_tokens, self.max_context - int(plen[i])) for i, p in enumerate(prm)]
        temp = torch.tensor([p.temperature for p in prm], dtype=torch.float32)
        top_p = torch.tensor([p.top_p for p in prm], dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in prm], dtype=torch.long)
        T = max(max_new + [1])
        U = torch.stack([_seed_uniforms(sample_seed(p.sampling_seed, j), T) for p, (_, j) in zip(prm, rows)])
        stop_ids = [set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids) for p in prm]
        stop_strs = [[s.encode() for s in p.stop if s] for p in prm]
        want_lp = [reqs[ri].return_logprob for ri, _ in rows]
        top_n = [reqs[ri].top_logprobs_num for ri, _ in rows]
        prefixes = [r.input_ids[:-1] for r in reqs]

        # prefix KV (module doc: the same bits in every mode), then each sample runs its last prompt token
        if not self.cfg.prefix_reuse:        # baseline: every sample computes its own prefix
            groups = [(c, 1) for c in self._prefill_each([prefixes[ri] for ri, _ in rows])]
            cached = [0] * R
            fwd = sum(len(prefixes[ri]) for ri, _ in rows)
        else:
            if self.radix is None:           # a request's prefix once, shared by its n samples
                chunks, new = self._prefill_each(prefixes), [len(p) for p in prefixes]
                fwd = sum(new)
            else:
                chunks, new, fwd = self._radix_prefix(reqs)
            groups = [(c, r.params.n) for c, r in zip(chunks, reqs)]
            cached = [len(prefixes[ri]) - (new[ri] if j == 0 else 0) for ri, j in rows]
        cache, mask = self._decode_cache(groups, T + 1)
        del groups
        last = torch.tensor([reqs[ri].input_ids[-1] for ri, _ in rows]).unsqueeze(1)
        mask = torch.cat([mask, torch.ones((R, 1), dtype=torch.long)], 1)
        logits, cache = self._forward(last, mask, (plen - 1).unsqueeze(1), cache)
        fwd += R

        outs: list[list[int]] = [[] for _ in range(R)]
        lps: list[list] = [[] for _ in range(R)]
        tops: list[list] = [[] for _ in range(R)]
        tails = [b""] * R
        finish: list[dict | None] = [None] * R
        for i in range(R):
            if max_new[i] <= 0:
                finish[i] = {"type": "length", "length": 0}
        # batch slot -> row. Finished rows stay in the batch as idle slots (their tokens are
        # discarded) until at least compact_fraction of the slots are idle; then the cache is
        # compacted (one copy) instead of copying it every time a single row finishes.
        slots = torch.arange(R)
        idle = 0
        t = 0
        while True:
            live = [a for a, i in enumerate(slots.tolist()) if finish[i] is None]
            if not live:
                break
            if len(live) < len(slots) and (len(slots) - len(live)) >= self.cfg.compact_fraction * len(slots):
                k = torch.tensor(live, dtype=torch.long)
                cache.batch_select_indices(k)
                mask, slots, logits = mask[k], slots[k], logits[k]
                live = list(range(len(slots)))
            tok = sample_tokens(logits, temp[slots], top_p[slots], top_k[slots], U[slots, t])
            if any(want_lp[i] for i in slots.tolist()):
                logp = torch.log_softmax(logits.float(), -1)
            for a in live:
                i = int(slots[a])
                tid = int(tok[a])
                outs[i].append(tid)
                if want_lp[i]:
                    lps[i].append([float(logp[a, tid]), tid, None])
                    if top_n[i] > 0:
                        v, ix = logp[a].topk(min(top_n[i], logp.shape[1]))
                        tops[i].append([[float(x), int(y), None] for x, y in zip(v, ix)])
                if tid in stop_ids[i]:
                    finish[i] = {"type": "stop", "matched": tid}
                elif stop_strs[i]:
                    tails[i] = (tails[i] + self.token_bytes.table[tid] if tid < len(self.token_bytes.table) else tails[i])
                    hit = next((s for s in stop_strs[i] if s in tails[i]), None)
                    if hit is not None:
                        finish[i] = {"type": "stop", "matched": hit.decode()}
                    tails[i] = tails[i][-64:]
                if finish[i] is None and len(outs[i]) >= max_new[i]:
                    finish[i] = {"type": "length", "length": max_new[i]}
            n_live = sum(finish[int(slots[a])] is None for a in live)
            if n_live == 0:
                break
            mask = torch.cat([mask, torch.ones((len(slots), 1), dtype=torch.long)], 1)
            pos = (plen[slots] + t).unsqueeze(1)
            logits, cache = self._forward(tok.unsqueeze(1), mask, pos, cache)
            fwd += n_live
            idle += len(slots) - n_live
            t += 1

        results: list[list[dict]] = [[] for _ in reqs]
        for i, (ri, j) in enumerate(rows):
            text = self.tokenizer.decode(outs[i], skip_special_tokens=True)
            m = finish[i].get("matched")
            if isinstance(m, str) and m in text:
                text = text[:text.index(m)]
            self._rid += 1
            meta = {"id": f"{reqs[ri].rid or 'req'}-{self._rid}", "prompt_tokens": int(plen[i]),
                    "completion_tokens": len(outs[i]), "cached_tokens": cached[i], "finish_reason": finish[i]}
            if want_lp[i]:
                meta["output_token_logprobs"] = lps[i]
                if top_n[i] > 0:
                    meta["output_top_logprobs"] = tops[i]
            results[ri].append({"text": text, "output_ids": outs[i], "meta_info": meta})
        s = self.stats
        s.requests += len(reqs)
        s.samples += R
        s.prompt_tokens += int(plen.sum())
        s.cached_tokens += sum(cached)
        s.completion_tokens += sum(len(o) for o in outs)
        s.forward_tokens += fwd
        s.idle_tokens += idle
        return results
