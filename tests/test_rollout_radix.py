"""Radix-tree prefix cache of the embedded engine: the tree itself (split, pin, LRU eviction), and the
engine with it: same output ids as without it (greedy and seeded sampling, across calls and batches,
under a small memory bound), exact ``cached_tokens``, consistency after a failed batch."""
from __future__ import annotations

import pytest
import torch

from dapo_mcore.rollout import embedded
from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig
from dapo_mcore.rollout.radix import RadixCache
from dapo_mcore.rollout.segment import TokenBytes
from dapo_mcore.rollout.states import build_states
from dapo_mcore.tasks.chain import make_problems

torch.set_num_threads(1)


# -- the tree ----------------------------------------------------------------------------------------
def _kv(tokens: list[int]) -> torch.Tensor:
    """Fake node KV [layers=2, 2, heads=1, len, dim=3] whose entries are the token ids (traceable)."""
    return torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1).expand(2, 2, 1, -1, 3).contiguous()


def _fill(tree: RadixCache) -> None:
    for n in tree.pending():
        tree.set_kv(n, _kv(n.key))


def _path_tokens(node) -> list[int]:
    """Tokens of a path read back from the stored KV (checks that splits keep KV and keys aligned)."""
    return [int(x) for n in node.path() for x in n.kv[0, 0, 0, :, 0]]


def test_tree_insert_split_share_and_match():
    tree = RadixCache(max_bytes=10 ** 9)
    a, k = tree.insert([1, 2, 3, 4, 5])
    assert k == 5 and [n.key for n in tree.pending()] == [[1, 2, 3, 4, 5]]
    _fill(tree)
    b, k = tree.insert([1, 2, 3, 9])           # splits [1..5] after 3
    assert k == 1 and [n.key for n in tree.pending()] == [[9]]
    c, k = tree.insert([1, 2])                 # ends inside an edge: split, nothing new
    assert k == 0 and tree.pending()[0].key == [9]
    _fill(tree)
    tree.check()
    assert _path_tokens(a) == [1, 2, 3, 4, 5] and _path_tokens(b) == [1, 2, 3, 9] and _path_tokens(c) == [1, 2]
    assert [n.key for n in a.path()] == [[1, 2], [3], [4, 5]]
    assert tree.tokens == 6 and tree.bytes == 6 * _kv([0]).nbytes
    assert tree.match_length([1, 2, 3, 4, 7]) == 4 and tree.match_length([5]) == 0 and tree.match_length([1, 2, 3]) == 3
    # pins: every node on a path, once per insert
    assert [n.refs for n in a.path()] == [3, 2, 1]
    for e in (a, b, c):
        tree.release(e)
    assert all(n.refs == 0 for n in tree._nodes())
    with pytest.raises(RuntimeError, match="unpinned"):
        tree.release(a)
    e, k = tree.insert([])
    assert e is tree.root and k == 0


def test_tree_evicts_unpinned_leaves_lru_first():
    per = _kv([0]).nbytes
    tree = RadixCache(max_bytes=4 * per)
    ends = {}
    for name, ids in [("x", [1, 2, 3]), ("y", [1, 2, 7, 8]), ("z", [5, 6])]:
        ends[name], _ = tree.insert(ids)
        _fill(tree)
    # stored: [1,2] [3] [7,8] [5,6] = 7 tokens > 4; all pinned: nothing evictable
    assert tree.evict() == 0 and tree.tokens == 7
    tree.release(ends["x"])
    tree.release(ends["z"])
    tree.insert([1, 2, 7, 8])                  # touch y again (still pinned twice)
    tree.release(ends["y"])                    # y pinned once more: [1,2] and [7,8] stay
    assert tree.evict() == 3                   # x's leaf [3] (older) then z [5,6]
    assert tree.tokens == 4 and tree.match_length([1, 2, 3]) == 2 and tree.match_length([5, 6]) == 0
    tree.check()
    tree.release(ends["y"])
    assert tree.evict(max_bytes=0) == 4        # leaf first, then its parent once it is a leaf
    assert tree.tokens == 0 and tree.bytes == 0 and not tree.root.children
    assert tree.evicted_tokens == 7
    tree.check()


def test_tree_discard_pending_keeps_computed_part():
    tree = RadixCache(max_bytes=10 ** 9)
    a, _ = tree.insert([1, 2, 3])
    _fill(tree)
    tree.release(a)
    b, _ = tree.insert([1, 2, 3, 4, 5])
    c, _ = tree.insert([1, 2, 3, 4, 5, 6])
    tree.release(b)
    tree.release(c)
    tree.discard_pending()
    tree.check()
    assert tree.pending() == [] and tree.match_length([1, 2, 3, 4, 5, 6]) == 3 and tree.tokens == 3


# -- the engine ----------------------------------------------------------------------------------------
def _mc_requests(tok, n_problems: int, n: int, seed0: int, max_new: int = 10) -> list[GenRequest]:
    """mc-stage requests: every non-terminal state of 2 solutions per problem (the true solution and
    one that leaves it after 2 steps), built by the mc stage's own ``build_states``: nested prefixes
    within a solution, shared prompt and first steps across the solutions of a problem. Odd states:
    seeded sampling (with top-k/top-p on some), even: greedy."""
    tb = TokenBytes(tok)
    reqs = []
    for p in make_problems(n_problems, seed=4, n_ops=(3, 5)):
        lines = p.solution().split("\n")
        other = "\n".join(lines[:2] + ["x = 0"] + lines[2:])
        sols = [(tok(t)["input_ids"] + [tok.eos_token_id], 1.0) for t in (p.solution(), other)]
        states = [s for s in build_states(p.id, tok(p.prompt)["input_ids"], sols, tb) if not s.terminal]
        for k, st in enumerate(states):
            sp = (SamplingParams(max_new_tokens=max_new, temperature=0.0, n=n) if k % 2 == 0 else
                  SamplingParams(max_new_tokens=max_new, temperature=0.9, n=n, sampling_seed=seed0 + len(reqs),
                                 top_k=20 if k % 4 == 1 else -1, top_p=0.9 if k % 4 == 3 else 1.0))
            reqs.append(GenRequest(st.input_ids, sp, rid=st.state_id, return_logprob=True))
    return reqs


def _engines(path, **kw):
    """(radix cache on, off): the same config otherwise (the same batches)."""
    radix = EmbeddedEngine(EngineConfig(str(path), **kw))
    kw["radix_cache_bytes"] = 0
    off = EmbeddedEngine(EngineConfig(str(path), **kw), model=radix.model, tokenizer=radix.tokenizer)
    return radix, off


def _assert_same(a, b, reqs):
    """Bit-identical: the same output ids and the same float logprobs (no tolerance)."""
    for r, ra, rb in zip(reqs, a, b):
        assert [s["output_ids"] for s in ra] == [s["output_ids"] for s in rb], r.rid
        for x, y in zip(ra, rb):
            assert x["meta_info"]["output_token_logprobs"] == y["meta_info"]["output_token_logprobs"], r.rid


def _count_forward_tokens(model):
    counter = {"tokens": 0}

    def hook(mod, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if mask.dim() == 4:   # prefix pass [B, 1, q, W]: a real query attends to its own column (its position)
            pos = kwargs["position_ids"]
            counter["tokens"] += int(mask[:, 0].gather(2, pos.unsqueeze(2)).sum())
        else:                 # decode step [B, W]: the last q columns
            counter["tokens"] += int(mask[:, -ids.shape[1]:].sum())

    return counter, model.register_forward_pre_hook(hook, with_kwargs=True)


def _check_accounting(eng, reqs) -> list[list[dict]]:
    """Run ``reqs``; the real tokens the model ran must be sum(prompt - cached) + fed-back + idle."""
    counter, h = _count_forward_tokens(eng.model)
    idle0 = eng.stats.idle_tokens
    try:
        res = eng.generate(reqs)
    finally:
        h.remove()
    samples = [s for r in res for s in r]
    computed = sum(s["meta_info"]["prompt_tokens"] - s["meta_info"]["cached_tokens"] for s in samples)
    fed_back = sum(max(len(s["output_ids"]) - 1, 0) for s in samples)
    assert counter["tokens"] == computed + fed_back + (eng.stats.idle_tokens - idle0)
    return res


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama_tied"])
def test_same_outputs_with_and_without_radix_across_calls_and_batches(fixture, request):
    """The mc workload in 3 calls (cold, then warm: later calls hit prefixes of earlier ones), with
    small batches (several states of different solutions/problems per batch): bit-identical outputs
    (ids and logprobs; greedy and seeded sampling) to the same calls without the radix cache and
    without any prefix reuse; then a repeat served wholly from the cache."""
    path = request.getfixturevalue(fixture)
    radix, off = _engines(path, max_batch_rows=12)
    plain = EmbeddedEngine(EngineConfig(str(path), prefix_reuse=False, max_batch_rows=12), model=radix.model,
                           tokenizer=radix.tokenizer)
    reqs = _mc_requests(radix.tokenizer, 4, n=3, seed0=50)
    assert len(reqs) >= 24
    for part in (reqs[0::3], reqs[1::3], reqs[2::3]):
        got = _check_accounting(radix, part)
        _assert_same(got, off.generate(part), part)
        _assert_same(got, plain.generate(part), part)
    radix.radix.check()
    s = radix.stats
    assert s.cached_tokens / s.prompt_tokens > off.stats.cached_tokens / off.stats.prompt_tokens
    # a repeat is served from the cache entirely: every sample computes only its last prompt token
    again = _check_accounting(radix, reqs)
    _assert_same(again, off.generate(reqs), reqs)
    assert all(x["meta_info"]["cached_tokens"] == len(r.input_ids) - 1 for r, res in zip(reqs, again) for x in res)


def test_prefix_kv_does_not_depend_on_batch_or_split(tiny_llama_tied, monkeypatch):
    """What makes the modes bit-identical: the prefix pass gives the same KV bits for a sequence
    alone, batched with rows of other lengths, or computed in runs on top of its own cached KV."""
    import random

    eng = EmbeddedEngine(EngineConfig(str(tiny_llama_tied)))
    rng = random.Random(0)
    V = eng.model.config.vocab_size
    seq = [rng.randrange(V) for _ in range(150)]
    with torch.inference_mode():
        (ref,) = eng._prefill([[]], [seq])
        for trial in range(12):
            B, row = rng.randint(1, 5), 0
            others = [[rng.randrange(V) for _ in range(rng.randint(1, 300))] for _ in range(B - 1)]
            cuts = sorted(rng.sample(range(1, 150), rng.randint(0, 3)))
            pasts = [[] for _ in range(B)]
            for a, b in zip([0] + cuts, cuts + [150]):
                news = [seq[a:b]] + [o[:rng.randint(1, 40)] for o in others]
                kvs = eng._prefill(pasts, news)
                pasts = [p + [k] for p, k in zip(pasts, kvs)]
                others = [o[len(n):] or [1] for o, n in zip(others, news[1:])]
            assert torch.equal(torch.cat(pasts[row], 3), ref), (B, cuts)
        # _prefill's own splitting: runs of at most 40 tokens, one row per pass
        monkeypatch.setattr(embedded, "_Q_CHUNK", 40)
        monkeypatch.setattr(embedded, "_ATTN_BUDGET", 1)
        kvs = eng._prefill([[], []], [others[0] * 3, seq])
        assert torch.equal(kvs[1], ref) and kvs[0].shape[3] == 3 * len(others[0])


def test_cached_tokens_exact(tiny_qwen2):
    """A constructed example: a cold prompt, a one-step extension and a branch of it, nested prefixes
    new in one batch; cached_tokens of every sample and the tree's contents."""
    eng, off = _engines(tiny_qwen2)
    tok = eng.tokenizer
    p = make_problems(1, seed=8)[0]
    A = tok(p.prompt + p.solution())["input_ids"][:24]
    assert len(A) == 24
    x = tok(" 7 step one")["input_ids"]
    B = A + x                                   # A extended by a step
    C = A[:12] + [t for t in x if t != A[12]][:5]   # leaves A after 12 tokens
    assert C[12] != A[12]
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, n=3, sampling_seed=1)

    def cached(res):
        return [[s["meta_info"]["cached_tokens"] for s in r] for r in res]

    # cold: sample 0 computes the prefix A[:-1]; samples 1, 2 reuse it
    assert cached(_check_accounting(eng, [GenRequest(A, sp)])) == [[0, len(A) - 1, len(A) - 1]]
    assert eng.radix.tokens == len(A) - 1 and eng.radix.match_length(A) == len(A) - 1
    # B finds A[:-1] cached (computes A[-1] + x[:-1] = len(x) tokens); C finds A[:12]
    res = _check_accounting(eng, [GenRequest(B, sp), GenRequest(C, sp)])
    order = sorted([B, C], key=len)             # generate runs a batch shortest first; results keep request order
    assert order[0] is C
    assert cached(res) == [[len(A) - 1, len(B) - 1, len(B) - 1], [12, len(C) - 1, len(C) - 1]]
    assert eng.radix.tokens == len(B) - 1 + (len(C) - 1 - 12)
    # nested prefixes both new in one batch (a different first token: nothing cached): the shorter one
    # computes the shared part, the longer one only its extension
    D = [t for t in tok(" 3 x 4 y 5 z")["input_ids"]] * 2
    assert D[0] not in eng.radix.root.children
    E = D + x
    res = _check_accounting(eng, [GenRequest(E, sp), GenRequest(D, sp)])
    assert cached(res) == [[len(D) - 1, len(E) - 1, len(E) - 1], [0, len(D) - 1, len(D) - 1]]
    eng.radix.check()
    # the same requests without the radix cache give the same tokens
    for reqs in ([GenRequest(B, sp), GenRequest(C, sp)], [GenRequest(E, sp), GenRequest(D, sp)]):
        assert [[s["output_ids"] for s in r] for r in eng.generate(reqs)] == \
               [[s["output_ids"] for s in r] for r in off.generate(reqs)]
    # flush: cold again
    eng.flush_cache()
    assert eng.radix.tokens == 0
    assert cached(eng.generate([GenRequest(A, sp)])) == [[0, len(A) - 1, len(A) - 1]]


def test_small_memory_bound_evicts_and_outputs_stay_identical(tiny_llama_tied):
    """A bound of ~1.5 states' KV: the cache evicts (LRU) after every batch, never holds more than the
    bound between batches, accounting stays exact and the outputs are those without the cache."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_llama_tied)
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    reqs = _mc_requests(AutoTokenizer.from_pretrained(tiny_llama_tied), 3, n=2, seed0=7)
    bound = int(1.5 * len(reqs[0].input_ids)) * per_token
    radix, off = _engines(tiny_llama_tied, max_batch_rows=8, radix_cache_bytes=bound)
    for i in range(0, len(reqs), 5):
        part = reqs[i:i + 5]
        _assert_same(_check_accounting(radix, part), off.generate(part), part)
        assert radix.radix.bytes <= bound
        radix.radix.check()
        assert all(n.refs == 0 for n in radix.radix._nodes())
    assert radix.stats.evicted_tokens > 0 and radix.radix.evicted_tokens == radix.stats.evicted_tokens
    assert radix.kv_token_bytes == per_token and radix.radix.bytes == radix.radix.tokens * per_token


def test_failed_batch_leaves_tree_consistent(tiny_qwen2, monkeypatch):
    """A forward that raises while the pending prefixes are computed: the tree drops them, holds no
    pins, and the next call computes them and gives the outputs of an engine without the cache."""
    radix, off = _engines(tiny_qwen2)
    reqs = _mc_requests(radix.tokenizer, 2, n=2, seed0=3)
    radix.generate(reqs[:2])
    real = radix._prefill_pass
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(radix, "_prefill_pass", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        radix.generate(reqs[2:])
    radix.radix.check()
    assert radix.radix.pending() == [] and all(n.refs == 0 for n in radix.radix._nodes())
    assert radix.radix.tokens > 0                 # what the first call stored is kept
    _assert_same(radix.generate(reqs), off.generate(reqs), reqs)


def test_radix_config_errors(tiny_qwen2):
    with pytest.raises(ValueError, match="radix_cache_bytes"):
        EngineConfig(str(tiny_qwen2), radix_cache_bytes=-1)
    eng = EmbeddedEngine(EngineConfig(str(tiny_qwen2), prefix_reuse=False))
    assert eng.radix is None


@pytest.mark.parametrize("h,kvh,d", [(4, 2, 16), (9, 3, 64), (4, 4, 32)])
def test_prefix_attention_matches_sdpa_and_ignores_kv_width(h, kvh, d):
    """prefix_attention = SDPA to fp32 rounding (GQA 4/2 and 9/3 as SmolLM2, MHA; boolean mask), and its
    bits for a row do not change when masked KV columns are appended (widths 160..700, incl. 224-288
    where MKL's ``p @ v`` changed bits on an AVX2 CPU)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    B, q, W0 = 2, 32, 160
    rep = h // kvh
    query = torch.randn(B, h, q, d, generator=g)
    key, value = torch.randn(B, kvh, W0, d, generator=g), torch.randn(B, kvh, W0, d, generator=g)
    mask = torch.arange(W0).view(1, 1, 1, W0) <= (torch.arange(q) + 120).view(1, 1, q, 1)
    mask = mask.expand(B, 1, q, W0)
    ref, _ = embedded.prefix_attention(None, query, key, value, mask, scaling=d ** -0.5)
    want = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                          attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)
    for W in range(W0 + 7, 700, 32):
        k2, v2 = torch.randn(B, kvh, W, d, generator=g), torch.randn(B, kvh, W, d, generator=g)
        k2[:, :, :W0], v2[:, :, :W0] = key, value
        m2 = torch.zeros(B, 1, q, W, dtype=torch.bool)
        m2[..., :W0] = mask
        got, _ = embedded.prefix_attention(None, query, k2, v2, m2, scaling=d ** -0.5)
        assert torch.equal(got, ref), W


def test_prefix_attention_skipped_kv_blocks_change_no_bits(monkeypatch):
    """A long causal pass (q = 320: three query tiles, the first sees 2 of 5 KV blocks) gives the same bits
    as one tile over every block, and SDPA's values to fp32 rounding."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    B, h, kvh, q, d, m = 2, 9, 3, 320, 32, 150
    W = m + q
    query = torch.randn(B, h, q, d, generator=g)
    key, value = torch.randn(B, kvh, W, d, generator=g), torch.randn(B, kvh, W, d, generator=g)
    mask = (torch.arange(W).view(1, 1, 1, W) <= (torch.arange(q) + m).view(1, 1, q, 1)).expand(B, 1, q, W)
    tiled, _ = embedded.prefix_attention(None, query, key, value, mask)
    monkeypatch.setattr(embedded, "_Q_TILE", 1 << 20)
    whole, _ = embedded.prefix_attention(None, query, key, value, mask)
    assert torch.equal(tiled, whole)
    want = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                          attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(tiled, want, rtol=1e-5, atol=1e-6)
