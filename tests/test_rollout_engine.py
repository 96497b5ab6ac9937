"""Embedded engine: prefix-KV reuse must not change what is generated, and cached_tokens must be
exactly what was reused."""
from __future__ import annotations

import pytest
import torch

from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.embedded import EmbeddedEngine, EngineConfig, sample_tokens
from dapo_mcore.tasks.toy import build_toy_completer
from dapo_mcore.tasks.chain import make_problems

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return build_toy_completer(tmp_path_factory.getbasetemp() / "toy_completer", steps=100)


@pytest.fixture(scope="module")
def engines(toy):
    """(prefix reuse with the radix cache: the default, no reuse at all)."""
    reuse = EmbeddedEngine(EngineConfig(str(toy), prefix_reuse=True))
    plain = EmbeddedEngine(EngineConfig(str(toy), prefix_reuse=False), model=reuse.model, tokenizer=reuse.tokenizer)
    return reuse, plain


@pytest.fixture(scope="module")
def within_request(engines):
    """Prefix reuse among a request's n samples only (no radix cache)."""
    return EmbeddedEngine(EngineConfig(engines[0].cfg.model_path, radix_cache_bytes=0), model=engines[0].model,
                          tokenizer=engines[0].tokenizer)


def _prompts(tok, n=5):
    """Prompts of different lengths: problem + a prefix of its solution."""
    out = []
    for i, p in enumerate(make_problems(n, seed=3)):
        sol = p.solution()
        out.append(tok(p.prompt + sol[: (7 * i) % (len(sol) + 1)])["input_ids"])
    return out


def test_greedy_identical_with_and_without_reuse_and_hf_generate(engines):
    reuse, plain = engines
    prompts = _prompts(reuse.tokenizer)
    reqs = [GenRequest(ids, SamplingParams(max_new_tokens=20, temperature=0.0, n=3)) for ids in prompts]
    a, b = reuse.generate(reqs), plain.generate(reqs)
    for ids, ra, rb in zip(prompts, a, b):
        assert [s["output_ids"] for s in ra] == [s["output_ids"] for s in rb]
        assert len({tuple(s["output_ids"]) for s in ra}) == 1          # greedy: all n samples agree
        ref = reuse.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                   eos_token_id=sorted(reuse.eos_ids), pad_token_id=reuse.pad_id)[0, len(ids):].tolist()
        assert ra[0]["output_ids"] == ref


def test_logits_equal_to_plain_forward(engines):
    """Full next-token distributions (top_logprobs over the whole vocab) of reuse and no-reuse
    decoding equal a single unpadded forward pass of the model over prompt + output."""
    reuse, plain = engines
    V = reuse.model.config.vocab_size
    prompts = _prompts(reuse.tokenizer, 4)
    reqs = [GenRequest(ids, SamplingParams(max_new_tokens=8, temperature=1.0, n=2, sampling_seed=11),
                       return_logprob=True, top_logprobs_num=V) for ids in prompts]
    for eng in (reuse, plain):
        for ids, samples in zip(prompts, eng.generate(reqs)):
            for s in samples:
                out = s["output_ids"]
                full = torch.tensor([ids + out])
                with torch.no_grad():
                    ref = torch.log_softmax(reuse.model(full).logits[0].double(), -1)[len(ids) - 1: len(ids) - 1 + len(out)]
                got = torch.full_like(ref, float("nan"))
                for t, row in enumerate(s["meta_info"]["output_top_logprobs"]):
                    for lp, tid, _ in row:
                        got[t, tid] = lp
                assert not torch.isnan(got).any()
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
                chosen = torch.tensor([x[0] for x in s["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
                torch.testing.assert_close(chosen, ref[torch.arange(len(out)), torch.tensor(out)], atol=2e-5, rtol=0)


def _count_forward_tokens(model):
    """Counts the real (non-padding) new tokens of every forward, read from its attention mask."""
    counter = {"tokens": 0}

    def hook(mod, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if mask.dim() == 4:   # prefix pass [B, 1, q, W]: a real query attends to its own column (its position)
            pos = kwargs["position_ids"]
            counter["tokens"] += int(mask[:, 0].gather(2, pos.unsqueeze(2)).sum())
        else:                 # decode step [B, W]: the last q columns
            counter["tokens"] += int(mask[:, -ids.shape[1]:].sum())

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    return counter, h


@pytest.mark.parametrize("mode", ["radix", "within_request", "plain"])
def test_cached_tokens_is_what_was_really_reused(engines, within_request, mode):
    """Equal-length prompts: real tokens the model ran = sum(prompt - cached) + fed-back generated
    tokens (each output token except the last) + idle decode slots."""
    eng = {"radix": engines[0], "within_request": within_request, "plain": engines[1]}[mode]
    tok = eng.tokenizer
    prompts = [tok(p.prompt)["input_ids"] for p in make_problems(40, seed=5)]
    L = len(prompts[0])
    prompts = [p for p in prompts if len(p) == L][:3]
    assert len(prompts) >= 2
    reqs = [GenRequest(ids, SamplingParams(max_new_tokens=6, temperature=1.0, n=4, sampling_seed=i))
            for i, ids in enumerate(prompts)]
    counter, h = _count_forward_tokens(eng.model)
    idle0 = eng.stats.idle_tokens
    try:
        res = eng.generate(reqs)
    finally:
        h.remove()
    samples = [s for r in res for s in r]
    computed_prompt = sum(s["meta_info"]["prompt_tokens"] - s["meta_info"]["cached_tokens"] for s in samples)
    fed_back = sum(len(s["output_ids"]) - 1 for s in samples)
    idle = eng.stats.idle_tokens - idle0          # decode slots of finished rows not yet compacted away
    assert counter["tokens"] == computed_prompt + fed_back + idle
    cached = [s["meta_info"]["cached_tokens"] for s in samples]
    if mode == "within_request":
        assert cached == [0, L - 1, L - 1, L - 1] * len(prompts)
    elif mode == "radix":   # sample 0 is charged what its request added to the tree (exact values: test_rollout_radix)
        assert all(c == L - 1 for i, c in enumerate(cached) if i % 4) and all(0 <= c <= L - 1 for c in cached)
    else:
        assert cached == [0] * len(samples)


def test_sampling_is_seeded_per_sample_not_per_batch(engines):
    reuse, plain = engines
    prompts = _prompts(reuse.tokenizer, 4)
    reqs = [GenRequest(ids, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50 if i % 2 else -1,
                                           top_p=0.95 if i % 2 else 1.0, n=4,
                                           sampling_seed=100 + i)) for i, ids in enumerate(prompts)]
    together = reuse.generate(reqs)
    alone = [reuse.generate([r])[0] for r in reqs]
    baseline = plain.generate(reqs)
    for t, a, b in zip(together, alone, baseline):
        assert [s["output_ids"] for s in t] == [s["output_ids"] for s in a] == [s["output_ids"] for s in b]
    assert len({tuple(s["output_ids"]) for s in together[0]}) > 1      # the n samples differ


def test_stop_strings_eos_and_length(engines):
    reuse, _ = engines
    tok = reuse.tokenizer
    ids = tok(make_problems(1, seed=9)[0].prompt)["input_ids"]
    (s,), = reuse.generate([GenRequest(ids, SamplingParams(max_new_tokens=40, temperature=0.0, stop=["\n"]))])
    assert s["meta_info"]["finish_reason"] == {"type": "stop", "matched": "\n"}
    assert "\n" not in s["text"] and tok.decode(s["output_ids"]).endswith("\n")
    (s,), = reuse.generate([GenRequest(ids, SamplingParams(max_new_tokens=3, temperature=0.0))])
    assert s["meta_info"]["finish_reason"] == {"type": "length", "length": 3} and len(s["output_ids"]) == 3
    (s,), = reuse.generate([GenRequest(ids, SamplingParams(max_new_tokens=80, temperature=0.0))])
    assert s["meta_info"]["finish_reason"]["type"] == "stop"
    assert s["output_ids"][-1] == s["meta_info"]["finish_reason"]["matched"] in reuse.eos_ids
    (s,), = reuse.generate([GenRequest(ids, SamplingParams(max_new_tokens=0))])
    assert s["output_ids"] == [] and s["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_sample_tokens_matches_distribution_filters():
    """top-k / top-p never pick a filtered token; greedy picks argmax; u maps through the CDF."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    u = torch.rand(4, dtype=torch.float64)
    t = torch.tensor([1.0, 1.0, 0.0, 0.7])
    tok = sample_tokens(logits, t, torch.tensor([1.0, 1.0, 1.0, 0.5]), torch.tensor([-1, 3, -1, -1]), u)
    assert int(tok[1]) in logits[1].topk(3).indices.tolist()
    assert int(tok[2]) == int(logits[2].argmax())
    p = torch.softmax(logits[3] / 0.7, -1).double()
    sp, order = p.sort(descending=True)
    nucleus = order[: int(((sp.cumsum(0) - sp) < 0.5).sum())].tolist()
    assert int(tok[3]) in nucleus
    cdf = torch.softmax(logits[0].double(), -1).cumsum(0)
    assert int(tok[0]) == int(torch.searchsorted(cdf, u[0] * cdf[-1], right=True))
    # empirical frequencies follow the softmax (10k draws, one row)
    draws = sample_tokens(logits[:1].expand(10000, -1), torch.ones(10000), torch.ones(10000),
                          torch.full((10000,), -1), torch.rand(10000, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=50).double() / 10000
    assert (freq - torch.softmax(logits[0].double(), -1)).abs().max() < 0.02


def test_bad_requests_raise(engines):
    reuse, _ = engines
    with pytest.raises(ValueError, match="input_ids is empty"):
        GenRequest([], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="out of range"):
        reuse.generate([GenRequest([10, 10 ** 6], SamplingParams(max_new_tokens=1))])
    with pytest.raises(ValueError, match="context"):
        reuse.generate([GenRequest([5] * 10_000, SamplingParams(max_new_tokens=1))])


def test_one_token_prompts_mixed_with_long_ones(engines):
    """A 1-token prompt has an empty prefix (fully padded row in the prefix pass): still exact."""
    reuse, plain = engines
    long = reuse.tokenizer(make_problems(1, seed=1)[0].prompt)["input_ids"]
    reqs = [GenRequest([long[0]], SamplingParams(max_new_tokens=6, temperature=0.0, n=2)),
            GenRequest(long, SamplingParams(max_new_tokens=6, temperature=0.0, n=2))]
    a, b = reuse.generate(reqs), plain.generate(reqs)
    assert [[s["output_ids"] for s in r] for r in a] == [[s["output_ids"] for s in r] for r in b]
    assert [s["meta_info"]["cached_tokens"] for s in a[0]] == [0, 0]
    alone = reuse.generate(reqs[:1])[0]
    assert [s["output_ids"] for s in alone] == [s["output_ids"] for s in a[0]]


def test_reuse_exact_on_llama_with_tied_embeddings(tiny_llama_tied):
    reuse = EmbeddedEngine(EngineConfig(str(tiny_llama_tied), prefix_reuse=True))
    plain = EmbeddedEngine(EngineConfig(str(tiny_llama_tied), prefix_reuse=False), model=reuse.model,
                           tokenizer=reuse.tokenizer)
    prompts = _prompts(reuse.tokenizer, 3)
    reqs = [GenRequest(ids, SamplingParams(max_new_tokens=10, temperature=0.8, n=3, sampling_seed=i),
                       return_logprob=True) for i, ids in enumerate(prompts)]
    for ra, rb in zip(reuse.generate(reqs), plain.generate(reqs)):
        for a, b in zip(ra, rb):
            assert a["output_ids"] == b["output_ids"]
            la = torch.tensor([x[0] for x in a["meta_info"]["output_token_logprobs"]])
            lb = torch.tensor([x[0] for x in b["meta_info"]["output_token_logprobs"]])
            torch.testing.assert_close(la, lb, atol=2e-5, rtol=0)


def test_no_deprecated_cache_argument(engines):
    """The engine passes the KV cache under the name this transformers takes (`cache` in 5.24/5.25; its alias
    `past_key_values` warns there and is removed in 5.40), with and without prefix reuse."""
    import warnings

    prompts = _prompts(engines[0].tokenizer, n=2)
    for eng in engines:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values.*")
            eng.generate([GenRequest(ids, SamplingParams(max_new_tokens=4, temperature=0.0, n=2)) for ids in prompts])
