"""Evaluation: Wilson intervals, paired differences, greedy evaluation through the backends, comparison table."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dapo_mcore.eval import EvalConfig, evaluate_checkpoint, paired_difference, wilson_interval
from dapo_mcore.eval.evaluate import SetResult, load_results
from dapo_mcore.eval.table import compare, comparison_markdown, write_comparison
from dapo_mcore.tasks.toy import write_chain_problems
from dapo_mcore.tasks.chain import make_problems

torch.set_num_threads(1)


def test_wilson_matches_closed_form_and_reference_values():
    # Reference values (Wilson 1927 / Newcombe 1998 table): 8/10 -> (0.490, 0.943); 0/10 -> (0, 0.278)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    for c, n, conf in [(3, 7, 0.9), (50, 100, 0.95), (99, 100, 0.99)]:
        z = {0.9: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}[conf]
        p = c / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson_interval(c, n, conf) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_paired_difference():
    a = [1, 0, 0, 1, 0, 1]
    b = [1, 1, 1, 0, 0, 1]
    d = paired_difference(a, b)
    diffs = [0, 1, 1, -1, 0, 0]
    mean = sum(diffs) / 6
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5)
    assert d["diff"] == pytest.approx(mean)
    assert d["hi"] - d["diff"] == pytest.approx(1.959963984540054 * sd / math.sqrt(6))
    assert (d["b_only"], d["a_only"], d["n"]) == (2, 1, 6)
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


class OracleBackend:
    """Answers problem i correctly iff i is even (tests the evaluation bookkeeping, not a model)."""

    def __init__(self, problems):
        self.sol = {p.prompt: p for p in problems}
        self.requests = []

    def generate(self, reqs):
        from transformers import AutoTokenizer  # noqa: F401 (same path as real backends)

        out = []
        for r in reqs:
            self.requests.append(r)
            p = self.sol[self.tok.decode(r.input_ids)]
            right = int(p.id[1:]) % 2 == 0
            text = p.solution() if right else "answer: -1"
            out.append([{"text": text, "output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}}}])
        return out

    def close(self):
        pass


def test_evaluate_checkpoint_bookkeeping(tiny_qwen2, tmp_path):
    from transformers import AutoTokenizer

    path = write_chain_problems(tmp_path / "set.jsonl", 9, seed=3)
    be = OracleBackend(make_problems(9, 3))
    be.tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    cfg = EvalConfig(max_new_tokens=20, batch_requests=4, show_progress=False)
    res = evaluate_checkpoint(cfg, tiny_qwen2, {"chain": str(path)}, tmp_path / "out", backend=be)
    r = res["chain"]
    assert (r.n, r.correct) == (9, 5) and r.accuracy == pytest.approx(5 / 9)
    assert all(q.params.temperature == 0 and q.params.n == 1 and q.params.max_new_tokens == 20 for q in be.requests)
    meta = json.loads((tmp_path / "out" / "results.json").read_text())
    assert meta["sets"]["chain"]["correct"] == 5
    assert meta["sets"]["chain"]["ci_lo"] == pytest.approx(wilson_interval(5, 9)[0])
    back = load_results(tmp_path / "out")["chain"]
    assert back.rewards == r.rewards and back.ids == r.ids
    with pytest.raises(ValueError, match="no evaluation problem sets"):
        evaluate_checkpoint(cfg, tiny_qwen2, {}, tmp_path / "o2", backend=be)


def test_greedy_embedded_equals_hf_generate(tiny_qwen2, tmp_path):
    """The embedded backend at temperature 0 gives exactly HF's greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_chain_problems(tmp_path / "set.jsonl", 3, seed=5)
    cfg = EvalConfig(max_new_tokens=12, show_progress=False)
    evaluate_checkpoint(cfg, tiny_qwen2, {"s": str(path)}, tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "s.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    lm = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    for p, row in zip(make_problems(3, 5), rows):
        ids = torch.tensor([tok(p.prompt)["input_ids"]])
        gen = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert row["text"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def test_compare_table_and_mismatch(tmp_path):
    ids = ["a", "b", "c", "d"]
    ref = {"s": SetResult("s", ids, [1, 0, 0, 0], 0.95)}
    new = {"s": SetResult("s", ids, [1, 1, 1, 0], 0.95)}
    cmp = write_comparison({"reference": ref, "dapo": new}, tmp_path)
    assert cmp["accuracy"]["dapo"]["s"]["accuracy"] == 0.75
    assert cmp["vs_baseline"]["dapo"]["s"]["diff"] == pytest.approx(0.5)
    md = (tmp_path / "comparison.md").read_text()
    assert "| s | 4 | 25.0% [" in md and "| dapo | s | +50.0 |" in md
    assert md == comparison_markdown(json.loads((tmp_path / "comparison.json").read_text()))
    other = {"s": SetResult("s", ["a", "b", "c", "e"], [1, 1, 1, 0], 0.95)}
    with pytest.raises(ValueError, match="different problems"):
        compare({"reference": ref, "x": other})
