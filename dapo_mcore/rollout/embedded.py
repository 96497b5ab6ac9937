"""Embedded generation engine: an in-process transformers model that really reuses each
state's prefix KV across its ``n`` samples and decodes many states as one batch.

With ``prefix_reuse=True`` the prompts of a batch (all tokens but the last) are run once, left
padded, into a ``DynamicCache``; the cache rows are then expanded to the ``n`` samples of each
prompt (``batch_select_indices``) and every sample computes only the last prompt token and its own
new tokens. With ``prefix_reuse=False`` every sample runs its whole prompt (the baseline).
Finished rows are dropped from the batch as they finish.

``cached_tokens`` is reported per sample and is exact: the prefix of a request is computed once,
charged to its sample 0 (``cached_tokens = 0``); samples 1..n-1 report ``prompt_tokens - 1``. So
``sum(prompt_tokens - cached_tokens)`` over a request's samples equals the prompt tokens the model
really ran. (SGLang, whose cache was filled by a separate warm-up pass, reports ``prompt_tokens-1``
for all n samples.)

Sampling is seeded per sample (:func:`~dapo_mcore.rollout.backend.sample_seed`): each row draws its
uniforms from its own ``torch.Generator``, so its tokens do not depend on which other rows share
the batch (given equal logits).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dapo_mcore.rollout.backend import GenRequest, sample_seed
from dapo_mcore.rollout.segment import TokenBytes


@dataclass
class EngineConfig:
    """``max_batch_rows``: sequences decoded together (a request's n samples are never split);
    ``max_context``: prompt + new tokens limit (default: the model's max_position_embeddings);
    ``compact_fraction``: drop finished rows from the batch once this fraction of it is idle."""

    model_path: str
    prefix_reuse: bool = True
    max_batch_rows: int = 256
    dtype: str = "float32"
    max_context: int | None = None
    compact_fraction: float = 0.25


@dataclass
class EngineStats:
    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0        # sum over samples
    cached_tokens: int = 0        # sum over samples
    completion_tokens: int = 0
    forward_tokens: int = 0       # real (non-pad) tokens the model ran, prompt + decode
    idle_tokens: int = 0          # decode slots of already-finished rows awaiting compaction
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _seed_uniforms(seed: int | None, length: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return torch.rand(max(length, 1), generator=g, dtype=torch.float64)


def _make_buffer_cache(prefill_cache, rows: torch.Tensor | None, capacity: int):
    """A ``DynamicCache`` whose layers hold ``prefill_cache``'s KV (rows ``rows`` of it, in that
    order, repeats allowed: this is where a prefix is expanded to its n samples) in buffers of
    ``capacity`` positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, k: torch.Tensor, v: torch.Tensor, cap: int):
            super().__init__()
            R, H, n, D = k.shape
            self._kb = k.new_empty((R, H, cap, D))
            self._vb = v.new_empty((R, v.shape[1], cap, v.shape[3]))
            self._kb[:, :, :n] = k
            self._vb[:, :, :n] = v
            self._n = n
            self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
            self._views()

        def _views(self):
            self.keys, self.values = self._kb[:, :, :self._n], self._vb[:, :, :self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            q = key_states.shape[-2]
            if self._n + q > self._kb.shape[2]:  # grow (not expected: capacity covers max_new_tokens)
                extra = max(q, self._kb.shape[2] // 2)
                self._kb = torch.cat([self._kb, self._kb.new_empty(self._kb.shape[:2] + (extra, self._kb.shape[3]))], 2)
                self._vb = torch.cat([self._vb, self._vb.new_empty(self._vb.shape[:2] + (extra, self._vb.shape[3]))], 2)
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

    cache = DynamicCache()
    layers = []
    for layer in prefill_cache.layers:
        k, v = layer.keys, layer.values
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        layers.append(BufferLayer(k, v, capacity))
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


class EmbeddedEngine:
    """In-process generation backend (see module doc). Thread-safe (one batch at a time)."""

    def __init__(self, cfg: EngineConfig, model=None, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model_path)
        self.model = model or AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=getattr(torch, cfg.dtype))
        self.model.eval()
        self.token_bytes = TokenBytes(self.tokenizer)
        eos = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            eos |= set(e if isinstance(e, (list, tuple)) else ([e] if e is not None else []))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos, default=0)
        self.max_context = cfg.max_context or int(getattr(self.model.config, "max_position_embeddings", 4096))
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

    def close(self) -> None:
        pass

    # -- internals ----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, L - len(s):] = torch.tensor(s)
                mask[i, L - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return ids, mask, pos

    def _run_group(self, reqs: list[GenRequest]) -> list[list[dict]]:
        from transformers import DynamicCache

        rows = [(ri, j) for ri, r in enumerate(reqs) for j in range(r.params.n)]
        R = len(rows)
        req_of_row = torch.tensor([ri for ri, _ in rows])
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
        cached = [0] * R
        fwd = 0

        T_cap = T + 1
        if self.cfg.prefix_reuse:
            prefixes = [r.input_ids[:-1] for r in reqs]
            if max(len(p) for p in prefixes) > 0:
                ids, pmask, pos = self._left_pad(prefixes)
                _, pre = self._forward(ids, pmask, pos, DynamicCache())
                fwd += int(pmask.sum())
                # expand each prompt's prefix KV to its n samples (the only copy of the prefix)
                cache = _make_buffer_cache(pre, req_of_row, ids.shape[1] + T_cap)
                mask = pmask[req_of_row]
            else:
                cache, mask = DynamicCache(), torch.zeros((R, 0), dtype=torch.long)
            for i, (ri, j) in enumerate(rows):
                cached[i] = len(reqs[ri].input_ids) - 1 if j > 0 else 0
            last = torch.tensor([reqs[ri].input_ids[-1] for ri, _ in rows]).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((R, 1), dtype=torch.long)], 1)
            logits, cache = self._forward(last, mask, (plen - 1).unsqueeze(1), cache)
            fwd += R
        else:
            ids, mask, pos = self._left_pad([reqs[ri].input_ids for ri, _ in rows])
            logits, pre = self._forward(ids, mask, pos, DynamicCache())
            cache = _make_buffer_cache(pre, None, ids.shape[1] + T_cap)
            fwd += int(mask.sum())

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
