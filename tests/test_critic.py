"""Critic: data from mc records, packing parity, TP/PP parity, shared-prefix scoring, resume, metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dapo_mcore.critic.data import (CriticExample, completion_examples, pack_examples, read_mc, solution_examples,
                                    split_by_problem, truncate)
from dapo_mcore.critic.metrics import auc, critic_metrics, ece, pearson


def _rec(pid, sol, k, steps, value, terminal=False, comps=()):
    return {"problem_id": pid, "state_id": f"{pid}/{sol}/{k}", "prompt_ids": [1, 2, 3], "step_ids": steps[:k],
            "num_steps": k, "terminal": terminal, "value": value, "num_completions": len(comps),
            "completions": list(comps), "actions": [], "sources": [[sol, k]]}


def test_solution_examples_label_each_prefix_at_its_last_token():
    steps = [[10, 11, 9], [12, 9], [13, 0]]
    recs = [_rec("p", 0, k, steps, v, k == 3) for k, v in enumerate([0.5, 0.4375, 0.75, 1.0])]
    (ex,) = solution_examples(reversed(recs))
    assert ex.tokens == [1, 2, 3, 10, 11, 9, 12, 9, 13, 0]
    assert ex.label_pos == [2, 5, 7, 9]                 # prompt end, then each step's last token
    assert ex.targets == [0.5, 0.4375, 0.75, 1.0]


def test_shared_state_labels_every_solution_and_float_targets_survive(tmp_path):
    """A deduplicated state (sources of two solutions) labels both; 0.4375 stays 0.4375 through the
    parquet shard round trip, the example and the packed float32 batch."""
    from dapo_mcore.data.shards import ShardedWriter

    s0, s1 = [[10, 9], [11, 0]], [[10, 9], [12, 0]]
    shared = _rec("p", 0, 1, s0, 0.4375)
    shared["sources"] = [[0, 1], [1, 1]]
    recs = [_rec("p", 0, 0, s0, 0.5), shared, _rec("p", 0, 2, s0, 1.0, True), _rec("p", 1, 2, s1, 0.0, True)]
    recs[0]["sources"] = [[0, 0], [1, 0]]
    w = ShardedWriter(tmp_path, "mc", {"t": 1}, "parquet")
    w.write_shard(0, recs)
    w.finalize(1)
    exs = solution_examples(read_mc(tmp_path))
    assert [e.targets for e in exs] == [[0.5, 0.4375, 1.0], [0.5, 0.4375, 0.0]]
    assert type(exs[0].targets[1]) is float
    mb = pack_examples(exs, 64, pad_id=0)[0]
    assert mb["targets"].dtype == torch.float32 and 0.4375 in mb["targets"].tolist()
    # labels point at the right tokens of the packed row
    ids = mb["input_ids"].reshape(-1)
    assert ids[mb["label_index"]].tolist() == [3, 9, 0, 3, 9, 0]


def test_completion_examples_label_step_ends_with_outcome():
    comps = [{"output_ids": [21, 9, 22, 9, 23, 0], "reward": 1.0, "finish": "stop"},
             {"output_ids": [24], "reward": 0.0, "finish": "length"}]
    (rec,) = [_rec("p", 0, 1, [[10, 9]], 0.5, comps=comps)]
    a, b = completion_examples([rec], delimiter_ids=[9], eos_id=0)
    assert a.tokens == [1, 2, 3, 10, 9, 21, 9, 22, 9, 23]   # EOS dropped
    assert a.label_pos == [6, 8, 9] and a.targets == [1.0, 1.0, 1.0]
    assert b.label_pos == [5] and b.targets == [0.0]


def test_split_by_problem_and_truncate_and_steps():
    exs = [CriticExample(f"p{i % 20}", [1] * (5 + i % 3), [0, 4], [0.1, 0.2]) for i in range(100)]
    train, val = split_by_problem(exs, 0.25, seed=0)
    assert {e.problem_id for e in train}.isdisjoint({e.problem_id for e in val})
    assert len(train) + len(val) == 100 and 0 < len(val) < 100
    t = truncate(CriticExample("p", list(range(10)), [2, 6, 9], [0.1, 0.2, 0.3]), 7)
    assert t.tokens == list(range(7)) and t.label_pos == [2, 6] and t.targets == [0.1, 0.2]
    assert truncate(CriticExample("p", list(range(10)), [9], [0.3]), 7) is None
    from dapo_mcore.training.loop import epoch_batches

    steps = epoch_batches(len(exs), 32, epochs=2, seed=1)
    assert len(steps) == 8 and sorted(sum(steps[:4], [])) == list(range(100))
    assert steps == epoch_batches(len(exs), 32, epochs=2, seed=1) and steps[0] != steps[4]


def test_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    t = rng.random(200)
    p = np.clip(t + rng.normal(0, 0.1, 200), 0, 1)
    m = critic_metrics(p, t, train_mean=float(t.mean()))
    assert m["brier"] == pytest.approx(np.mean((p - t) ** 2))
    assert m["brier"] < m["brier_baseline"]
    assert pearson(p, t) == pytest.approx(np.corrcoef(p, t)[0, 1])
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1.0])) == pytest.approx(0.75)
    assert ece(np.array([0.2, 0.2]), np.array([0.0, 1.0])) == pytest.approx(0.3)


@pytest.mark.dist
def test_packed_step_equals_unpacked_and_tp_pp(tiny_qwen2, synthetic_mc, torchrun, tmp_path):
    """One critic step: FFD-packed rows == one example per row (loss, every gradient incl. the head) ==
    three packed rows stacked per micro-batch; TP=2 and PP=2 == TP=1."""
    from safetensors.torch import load_file

    runs = {"packed": (1, 1, "packed", 1), "unpacked": (1, 1, "unpacked", 1), "tp2": (2, 1, "packed", 1),
            "pp2": (1, 2, "packed", 1), "rows3": (1, 1, "packed", 3)}
    res = {}
    for name, (tp, pp, pack, rows) in runs.items():
        out = tmp_path / name
        torchrun("critic_worker.py", tp * pp, "step", tp, pp, tiny_qwen2, synthetic_mc, out, "--pack", pack,
                 "--rows", rows)
        res[name] = (json.loads((out / "loss.json").read_text()), load_file(str(out / "grads.safetensors")))
    ref_loss, ref = res["packed"]
    assert res["unpacked"][0]["rows"] > ref_loss["rows"]          # packing did merge examples
    assert "score.weight" in ref and "score.bias" in ref
    assert res["rows3"][0]["rows"] < ref_loss["rows"]              # several rows per micro-batch
    for name in ("unpacked", "tp2", "pp2", "rows3"):
        loss, grads = res[name]
        assert loss["count"] == ref_loss["count"]
        assert abs(loss["loss"] - ref_loss["loss"]) <= 1e-6 * abs(ref_loss["loss"]), name
        for k in ref:
            rel = (grads[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-12)
            assert rel <= 1e-5, f"{name} {k}: {rel:.2e}"


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2])
def test_shared_prefix_scoring_equals_alone(tp, tiny_qwen2, torchrun, tmp_path):
    out = tmp_path / "score.json"
    torchrun("critic_worker.py", tp, "score", tp, 1, tiny_qwen2, out)
    r = json.loads(out.read_text())
    assert r["max_abs_diff"] <= 1e-5
    assert [len(v) for _, v in r["packed"]] == [3, 1, 4, 2]


@pytest.mark.dist
def test_stage_resume_equals_uninterrupted(tiny_qwen2, synthetic_mc, tmp_path):
    """`dapo-mcore train-critic CONFIG critic.max_steps=2` stops after 2 of 5 steps; the same command without it
    resumes: same per-step losses and bit-identical exported critic."""
    from conftest import run_cli, stage_run

    from dapo_mcore.models.convert import iter_hf_tensors

    critic = "critic: {lr: 1e-3, epochs: 1, global_batch: 16, token_budget: 256}\n"
    full, part = tmp_path / "full", tmp_path / "part"
    cfgs = {r: stage_run(r, tiny_qwen2, ["critic"], {"mc": synthetic_mc}, critic) for r in (full, part)}
    run_cli("train-critic", cfgs[full])
    assert run_cli("train-critic", cfgs[part], "critic.max_steps=2", check=False).returncode == 2
    full, part = full / "iter_0" / "critic", part / "iter_0" / "critic"
    assert not (part / "summary.json").exists()
    assert json.loads((part / "checkpoints" / "latest.json").read_text())["step"] == 2
    run_cli("train-critic", cfgs[part.parent.parent])
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [r["step"] for r in la] and len(la) >= 4
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]
    a = {n: f() for n, f in iter_hf_tensors(full / "hf")}
    b = {n: f() for n, f in iter_hf_tensors(part / "hf")}
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((full / "summary.json").read_text())
    for k in ("brier", "brier_baseline", "pearson", "ece", "auc"):
        assert k in s["heldout"]
    assert (full / "calibration.png").stat().st_size > 1000
