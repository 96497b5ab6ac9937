"""The sparse-reward demo's pieces: the task's error model and splits, one-step candidate actions in the mc
stage, outcome-only advantages ignoring uncompleted actions, RFT's token budget, controls in the first
iteration only, per-position diagnostics and the sparse table with its RESULT lines."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dapo_mcore.advantage.core import scorable, unique_actions
from dapo_mcore.data.shards import ShardedWriter, iter_records
from dapo_mcore.tasks.chain import make_problems
from dapo_mcore.verify.exact import extract_answer
from dapo_mcore.verify.steps import check_chain_step as check_step

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- task
def test_step_errors_are_spread_and_consistent():
    probs = make_problems(3000, 5, (8, 10))
    rng = random.Random(0)
    wrong_lines = total = 0
    positions = set()
    for p in probs:
        text = p.solution(0.0, rng, step_error_rate=0.1)
        lines = text.split("\n")
        state = p.prompt
        for i, ln in enumerate(lines[:-1]):
            ok = check_step(state, ln)          # each line checkable from the line before
            total += 1
            if not ok:
                wrong_lines += 1
                positions.add(i)
            state += ln + "\n"
        assert check_step(state, lines[-1])    # the answer line repeats the last value written
    assert 0.08 < wrong_lines / total < 0.12 and positions == set(range(10))
    # without step errors the demo's data is unchanged (no extra random draws)
    a, b = random.Random(3), random.Random(3)
    assert [p.solution(0.6, a) for p in probs[:50]] == [p.solution(0.6, b, step_error_rate=0.0) for p in probs[:50]]
    rng = random.Random(1)
    right = sum(extract_answer(p.solution(0.6, rng, step_error_rate=0.1)) == p.answer for p in probs) / len(probs)
    assert right < 0.12                          # the sparse regime: few whole solutions are right


def test_sparse_setup_splits_are_disjoint():
    from dapo_mcore.tasks.demo import _key
    from dapo_mcore.tasks.sparse import SparseSetup

    s = SparseSetup(sft_problems=2000, train_problems=200, val_problems=100, eval_problems=150)
    sets = s.problem_sets()
    assert list(sets) == ["sft", "train", "heldout", "val"]
    assert [len(sets[k]) for k in ("train", "val", "heldout")] == [200, 100, 150]
    keys = {k: {_key(p) for p in v} for k, v in sets.items()}
    for a in ("heldout", "val"):
        for b in sets:
            if a != b:
                assert not keys[a] & keys[b], (a, b)
    assert all(8 <= len(p.ops) <= 10 for p in sets["val"])


# ------------------------------------------------------------------------------ one-step candidates
@pytest.fixture(scope="module")
def toy_gen(tmp_path_factory):
    from dapo_mcore.generate.stage import GenerateConfig, run_generate
    from dapo_mcore.tasks.toy import build_toy_completer, write_chain_problems

    d = tmp_path_factory.mktemp("sparse_mc")
    toy = build_toy_completer(d / "toy", steps=100)
    probs = write_chain_problems(d / "problems.jsonl", 3, seed=1)
    run_generate(GenerateConfig(problems=str(probs), model_path=str(toy), num_samples=2, keep=1, max_new_tokens=48, shard_size=2,
                                batch_requests=2, show_progress=False), d / "gen")
    return toy, d


def test_mc_one_step_candidates(toy_gen, tmp_path):
    from transformers import AutoTokenizer

    from dapo_mcore.mc.stage import MCConfig, run_mc

    toy, d = toy_gen
    base = dict(num_completions=2, max_new_tokens=40, shard_size=3, batch_requests=2, show_progress=False)
    plain = run_mc(MCConfig(model_path=str(toy), **base), d / "gen", tmp_path / "plain")
    extra = run_mc(MCConfig(model_path=str(toy), num_actions=3, **base), d / "gen", tmp_path / "extra")
    tok = AutoTokenizer.from_pretrained(toy)
    nl = tok.encode("\n", add_special_tokens=False)
    a = {r["state_id"]: r for r in iter_records(tmp_path / "plain")}
    b = {r["state_id"]: r for r in iter_records(tmp_path / "extra")}
    assert a.keys() == b.keys()
    n_open = 0
    for sid, r in b.items():
        assert r["completions"] == a[sid]["completions"] and r["value"] == a[sid]["value"]   # completions unchanged
        if r["terminal"]:
            continue
        n_open += 1
        assert len(r["actions"]) == 2 + 3 and r["actions"][:2] == a[sid]["actions"]
        for act in r["actions"][2:]:
            ids = act["ids"]
            assert ids and (ids[-len(nl):] == nl) != act["ends_solution"]   # cut at the delimiter, or the end
            assert (act["reward"] is not None) == act["ends_solution"]
    assert extra["one_step"]["samples"] == 3 * n_open and "one_step" not in plain
    assert extra["throughput"]["samples"] == plain["throughput"]["samples"]
    # one-step samples are short: a whole step at most
    assert extra["one_step"]["completion_tokens"] < plain["throughput"]["completion_tokens"] * 3 / 2


def test_outcome_advantages_use_only_completed_actions():
    rec = {"completions": [{"reward": 1.0}, {"reward": 0.0}],
           "actions": [{"ids": [1], "text": "a"}, {"ids": [2], "text": "b"}, {"ids": [3], "text": "c"},
                       {"ids": [1], "text": "a"}, {"ids": [4], "text": "end", "ends_solution": True, "reward": 1.0}]}
    acts = unique_actions(rec)
    assert [a["ids"] for a in acts] == [[1], [2], [3], [4]] and acts[0]["count"] == 2
    assert [a["outcome"] for a in acts] == [1.0, 0.0, None, None]
    assert [a["ids"] for a in scorable(acts, "critic", True)] == [[1], [2], [3], [4]]
    assert [a["ids"] for a in scorable(acts, "outcome", True)] == [[1], [2], [4]]    # verified terminal kept
    assert [a["ids"] for a in scorable(acts, "outcome", False)] == [[1], [2]]


# ------------------------------------------------------------------------------------- pipeline
def _summary(d: Path, stage: str, samples: int, tokens: int, one=None, problems=None):
    d.mkdir(parents=True, exist_ok=True)
    s = {"stage": stage, "throughput": {"samples": samples, "completion_tokens": tokens}}
    if problems is not None:
        s["problems"] = problems
    if one:
        s["one_step"] = {"samples": one[0], "completion_tokens": one[1]}
    (d / "summary.json").write_text(json.dumps(s))


def test_rft_budget_in_samples_or_generated_tokens(tmp_path):
    from dapo_mcore.sft.rft import samples_per_problem

    _summary(tmp_path / "gen", "generate", 100, 5000, problems=50)      # 50 tokens per solution
    _summary(tmp_path / "mc", "mc", 800, 20000, one=(400, 2000))
    assert samples_per_problem(tmp_path / "gen", tmp_path / "mc") == 26                 # 1300 samples / 50
    assert samples_per_problem(tmp_path / "gen", tmp_path / "mc", "tokens") == 11       # 27000 / 50 / 50 = 10.8
    with pytest.raises(ValueError, match="run.budget"):
        samples_per_problem(tmp_path / "gen", tmp_path / "mc", "flops")


def test_controls_first_only_outcome_beta_and_token_budget_through_the_table(tmp_path):
    from dapo_mcore.config import ConfigError
    from dapo_mcore.run.pipeline import Pipeline, Plan
    from dapo_mcore.run.schema import load_run_config
    from dapo_mcore.run.stages import STAGE

    (tmp_path / "policy").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    over = [f"model.policy={tmp_path / 'policy'}", f"data.train={tmp_path / 'train.jsonl'}",
            f"run.out_dir={tmp_path / 'run'}", "run.controls=[outcome, rft]", "run.iterations=2"]
    names = lambda pipe, k: [s.name for s in pipe.units(k)]  # noqa: E731
    every = Pipeline(load_run_config(None, over))
    first = Pipeline(load_run_config(None, over + ["run.controls_first_only=true"]))
    assert names(every, 1) == names(every, 0) == names(first, 0)
    assert "rft" in names(first, 0) and names(first, 1) == ["generate", "mc", "critic", "advantage", "actor", "eval"]
    with pytest.raises(ConfigError, match="run.budget"):
        load_run_config(None, over + ["run.budget=flops"])
    # the fills: the outcome control's beta, RFT's K from the budget mode
    for s in ("generate", "mc"):
        d = tmp_path / "run" / "iter_0" / s
        _summary(d, s, 100 if s == "generate" else 800, 5000 if s == "generate" else 20000,
                 one=(400, 2000) if s == "mc" else None, problems=50)
        (d / "stage.json").write_text(json.dumps({"finished": True, "digest": "x"}))
    def filled(pipe, unit, key):
        return STAGE[unit].fills[key].value(Plan(pipe, 0))
    beta = Pipeline(load_run_config(None, over + ["run.outcome_beta=0.3", "actor.beta=0.05"]))
    assert filled(beta, "actor-outcome", "beta") == 0.3 and "beta" not in STAGE["actor"].fills
    assert filled(every, "actor-outcome", "beta") == every.cfg.actor.beta
    tokens = Pipeline(load_run_config(None, over + ["run.budget=tokens"]))
    assert filled(every, "rft-generate", "num_samples") == 26 and filled(tokens, "rft-generate", "keep") == 11


# ---------------------------------------------------------------------------------- diagnostics
def _write(d: Path, stage: str, records: list[dict], finished: bool = True) -> None:
    w = ShardedWriter(d, stage, {"t": stage}, "jsonl")
    w.write_shard(0, records)
    w.finalize(1)
    if finished:   # a stage's summary.json is written last
        (d / "summary.json").write_text(json.dumps({"stage": stage}))


def test_diagnostics_by_position(tmp_path):
    from dapo_mcore.eval.diagnostics import advantage_by_position, iteration_diagnostics

    it = tmp_path / "iter_0"
    _write(it / "mc", "mc", [{"state_id": f"s{k}", "num_steps": k} for k in range(3)])

    def act(q, out, text, adv):
        return {"ids": [1], "text": text, "count": 1, "outcome": out, "ends_solution": False, "critic_q": q,
                "q": q, "advantage": adv, "ref_logp": [], "ref_logp_sum": None}
    adv = [{"problem_id": "p", "state_id": "s0", "state_ids": [1], "v_state": 0.1, "gap": 0.4, "keep": True,
            "actions": [act(0.5, 1.0, "good", 0.2), act(0.1, 0.0, "bad", -0.2)]},
           {"problem_id": "p", "state_id": "s1", "state_ids": [1], "v_state": 0.1, "gap": 0.05, "keep": False,
            "actions": [act(0.2, 0.0, "good", 0.025), act(0.15, 1.0, "bad", -0.025), act(0.3, None, "bad", 0.1)]},
           {"problem_id": "p", "state_id": "s2", "state_ids": [1], "v_state": 0.1, "gap": 0.0, "keep": False,
            "actions": [act(0.2, 0.0, "good", 0.0), act(0.2, 0.0, "good", 0.0)]}]
    _write(it / "advantage", "advantage", adv)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "state"

    r = advantage_by_position(it / "advantage", {"s0": 0, "s1": 1, "s2": 2}, lambda s, a: a == "good", Tok())
    assert r["by_position"][0] == {"candidates": 1, "kept": 1, "kept_fraction": 1.0, "mean_abs_adv_kept": 0.2}
    assert r["by_position"][1]["kept_fraction"] == 0.0
    rk = r["ranking"]
    assert rk["by_position"][0]["vs_mc"] == 1.0 and rk["by_position"][1]["vs_mc"] == 0.0
    # position 1: good (0.2) beats the completed bad (0.15) but not the uncompleted one (0.3)
    assert rk["by_position"][1]["vs_correct"] == 0.5 and rk["by_position"][1]["correct_pairs"] == 2
    assert rk["mc_pairs"] == 2 and rk["correct_pairs"] == 3
    _write(it / "rft-generate", "generate", [{"num_samples": 4, "num_correct": c} for c in (0, 1, 3)])
    for s in ("generate", "mc"):
        _summary(it / s, s, 10, 100, problems=3)
    d = iteration_diagnostics(it)
    assert d["rft"] == {"problems": 3, "problems_with_correct": 2, "samples": 12, "correct_samples": 4}
    assert d["budget"]["dapo"]["generated_tokens"] == 200 and "advantage_critic" in d
    # an iteration stopped mid-way: outputs without summary.json are not read
    part = tmp_path / "iter_1"
    _write(part / "mc", "mc", [{"state_id": "s0", "num_steps": 0}], finished=False)
    _write(part / "advantage", "advantage", adv[:1])
    assert "advantage_critic" not in iteration_diagnostics(part)


def test_sparse_table_and_result_lines(tmp_path):
    from dapo_mcore.tasks.sparse import result_lines, sparse_table

    accs = {"reference": [0.1, 0.1], "dapo": [0.8, 0.7], "outcome-only": [0.5, 0.6], "rft": [0.65, 0.55]}
    n = 20
    for s in range(2):
        for lab, a in accs.items():
            d = tmp_path / f"seed{s}" / "iter_0" / "eval" / lab
            d.mkdir(parents=True)
            k = round(a[s] * n)
            rows = [{"id": f"h{i}", "reward": float(i < k)} for i in range(n)]
            (d / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "results.json").write_text(json.dumps({"sets": {"heldout": {"n": n, "confidence": 0.95}}}))
    text, fig = sparse_table([tmp_path / "seed0", tmp_path / "seed1"])
    assert fig["best_control"] == "RFT (control)" and fig["best_control_mean"] == pytest.approx(0.6)
    assert fig["dapo_mean"] == pytest.approx(0.75)
    assert fig["dapo_min_minus_control_max"] == pytest.approx(0.7 - 0.65)
    assert "DAPO − RFT (control)" in text and "iterative" not in text
    lines = result_lines(fig, 123.4)
    assert "RESULT sparse_dapo_mean 75.0 %" in lines and "RESULT sparse_best_control_mean 60.0 %" in lines
    assert "RESULT sparse_dapo_min_minus_control_max +5.0 points" in lines
    assert "RESULT sparse_demo_seconds 123 s" in lines and "RESULT sparse_reference_mean 10.0 %" in lines


def test_critic_identity_ignores_the_step_checker():
    from dapo_mcore.config import identity
    from dapo_mcore.critic.train import CriticConfig

    t = identity(CriticConfig(data="tree", tree_min_count=2, step_checker="chain"))
    assert t["data"] == "tree" and t["tree_min_count"] == 2 and "step_checker" not in t


def test_deepened_critic_init_computes_what_the_policy_computes(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo_mcore.critic.deepen import deepen_checkpoint

    out = deepen_checkpoint(tiny_qwen2, tmp_path / "deep", extra_layers=2)
    a = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2))
    b = AutoModelForCausalLM.from_pretrained(str(out))
    assert b.config.num_hidden_layers == a.config.num_hidden_layers + 2
    tok = AutoTokenizer.from_pretrained(str(out))
    x = torch.tensor([tok.encode("47:+8-3\n47+8=55\n", add_special_tokens=False)])
    assert torch.equal(a(x).logits, b(x).logits)
    top = b.model.layers[-1]
    assert top.mlp.down_proj.weight.abs().sum() == 0 and top.mlp.up_proj.weight.abs().sum() > 0
    with pytest.raises(ValueError):
        deepen_checkpoint(tiny_qwen2, tmp_path / "x", extra_layers=0)
