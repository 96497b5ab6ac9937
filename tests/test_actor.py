"""Advantage stage and DAPO actor: rules, shared-prefix parity with the unpacked computation, TP/PP parity,
stored reference log-probs, resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dapo_mcore.actor.train import state_batches
from dapo_mcore.advantage.core import advantages, keep_state, ranking_agreement, select_q, unique_actions
from dapo_mcore.training.logprobs import ActionGroup, pack_action_groups

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))


def _mc_rec(actions, rewards):
    return {"actions": [{"ids": ids, "text": str(ids), "ends_solution": ends, "reward": r if ends else None}
                        for (ids, ends), r in zip(actions, rewards)],
            "completions": [{"output_ids": ids, "reward": r, "finish": "stop"} for (ids, _), r in zip(actions, rewards)]}


def test_unique_actions_counts_and_outcomes():
    rec = _mc_rec([([1, 2], False), ([3], False), ([1, 2], False), ([4, 0], True), ([], False)],
                  [1.0, 0.0, 0.0, 1.0, 1.0])
    u = unique_actions(rec)
    assert [a["ids"] for a in u] == [[1, 2], [3], [4, 0]]       # first-seen order, empty action dropped
    assert [a["count"] for a in u] == [2, 1, 1]
    assert [a["outcome"] for a in u] == [0.5, 0.0, 1.0]
    assert [a["terminal_reward"] for a in u] == [None, None, 1.0]


def test_q_advantages_and_gap_filter():
    acts = [{"ends_solution": False, "terminal_reward": None, "outcome": 0.25},
            {"ends_solution": True, "terminal_reward": 0.0, "outcome": 0.0},
            {"ends_solution": False, "terminal_reward": None, "outcome": 1.0}]
    critic_q = [0.6, 0.9, 0.3]
    assert select_q(acts, critic_q, "critic", terminal_reward=True) == [0.6, 0.0, 0.3]
    assert select_q(acts, critic_q, "critic", terminal_reward=False) == [0.6, 0.9, 0.3]
    assert select_q(acts, None, "outcome", terminal_reward=True) == [0.25, 0.0, 1.0]
    a = advantages([0.6, 0.0, 0.3])
    assert a == pytest.approx([0.3, -0.3, 0.0]) and sum(a) == pytest.approx(0.0)
    assert keep_state(a, 0.1, 2) and keep_state(advantages([0.5, 0.6]), 0.1, 2)   # gap exactly 0.1 kept
    assert not keep_state(advantages([0.5, 0.59]), 0.1, 2)
    assert not keep_state([0.0], 0.0, 2)                                           # one unique action
    assert ranking_agreement([(0.9, 0.1, 1.0, 0.0), (0.2, 0.8, 1.0, 0.0), (0.5, 0.4, 0.5, 0.5)]) == 0.5


def test_state_batches_keep_states_whole():
    groups = [ActionGroup([1], [[2]] * n) for n in (3, 1, 4, 2, 5)]
    steps = state_batches(groups, global_batch_actions=6, epochs=1, seed=0)
    assert sorted(g for s in steps for g in s) == list(range(5))     # every state once, never split
    assert all(sum(len(groups[g].actions) for g in s) >= 6 for s in steps[:-1])
    two = state_batches(groups, global_batch_actions=6, epochs=2, seed=0)
    assert two[:len(steps)] == steps and sorted(g for s in two[len(steps):] for g in s) == list(range(5))


def test_pack_action_groups_targets_and_sharing():
    g = [ActionGroup([5, 6, 7], [[8, 9], [10]], [0.5, -0.5], [[-1.0, -2.0], [-3.0]]),
         ActionGroup([11], [[12]], [0.0], [[-0.5]])]
    (mb,) = pack_action_groups(g, 64, 0, shared=True)
    assert mb["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert mb["src"].tolist() == [2, 3, 2, 6] and mb["tgt"].tolist() == [8, 9, 10, 12]
    assert mb["seg"].tolist() == [0, 0, 1, 2] and mb["action_keys"] == [(0, 0), (0, 1), (1, 0)]
    assert mb["advantages"].tolist() == [0.5, -0.5, 0.0] and mb["ref_logp"].tolist() == [-1.0, -2.0, -3.0, -0.5]
    un = pack_action_groups(g, 64, 0, shared=False)
    assert sum(int(m["lengths"].sum()) for m in un) == 3 + 2 + 3 + 1 + 1 + 1   # the state repeated per action


@pytest.fixture(scope="module")
def advantage_dir(tiny_qwen2, synthetic_mc, tmp_path_factory):
    """The advantage stage (outcome advantages, ref log-probs from the tiny policy) on the synthetic mc data, as
    the pipeline launches it (a torchrun job of the worker)."""
    from conftest import run_stage_job

    from dapo_mcore.advantage.stage import AdvantageConfig

    out = tmp_path_factory.mktemp("adv") / "advantage"
    run_stage_job("advantage", AdvantageConfig(source="outcome", reference_path=str(tiny_qwen2), shard_size=40,
                                               token_budget=256), synthetic_mc, out)
    return out


@pytest.mark.dist
def test_advantage_stage_ref_logprobs_equal_fresh_computation(advantage_dir, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    from dapo_mcore.data.shards import iter_records

    s = json.loads((advantage_dir / "summary.json").read_text())
    recs = list(iter_records(advantage_dir))
    kept = [r for r in recs if r["keep"]]
    assert s["states_kept"] == len(kept) > 0 and s["candidate_states"] == len(recs)
    assert all(r["gap"] >= 0.1 for r in kept) and all(r["gap"] < 0.1 for r in recs if not r["keep"])
    assert (advantage_dir / "advantage_hist.png").stat().st_size > 1000
    m = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2)).eval()
    worst = 0.0
    for r in kept[:8]:
        assert abs(sum(a["advantage"] for a in r["actions"])) < 1e-9
        for a in r["actions"]:
            seq = torch.tensor([r["state_ids"] + a["ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(m(seq).logits[0].double(), -1)
            L = len(r["state_ids"])
            fresh = lp[torch.arange(L - 1, L + len(a["ids"]) - 1), torch.tensor(a["ids"])]
            worst = max(worst, (fresh - torch.tensor(a["ref_logp"], dtype=torch.float64)).abs().max().item())
            assert a["ref_logp_sum"] == pytest.approx(sum(a["ref_logp"]))
    assert worst <= 1e-4


def _hf_reference(model_dir, adv_dir):
    from actor_worker import BETA, shifted_groups
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    terms = []
    for g in shifted_groups(adv_dir):
        for a, adv, ref in zip(g.actions, g.advantages, g.ref_logp):
            lp = torch.log_softmax(m(torch.tensor([g.state + a])).logits[0].double(), -1)
            L = len(g.state)
            r = lp[torch.arange(L - 1, L + len(a) - 1), torch.tensor(a)].sum() - sum(ref)
            terms.append(0.5 * (adv / BETA - r) ** 2)
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in m.named_parameters()}


@pytest.mark.dist
def test_dapo_step_shared_prefix_equals_unpacked_and_tp_pp(advantage_dir, tiny_qwen2, torchrun, tmp_path):
    """One DAPO step: shared-prefix rows == one (s, a) per document, TP=2 and PP=2 == TP=1, the reference ops ==
    the fused ops, and all == a plain transformers computation per (s, a). Loss within relative 1e-5; every
    gradient within relative 3e-5 of its max (each variant reorders fp32 sums: 1.05e-5 seen on an AMX machine)."""
    from safetensors.torch import load_file

    runs = {"shared": (1, 1, []), "unshared": (1, 1, ["--unshared"]), "tp2": (2, 1, []), "pp2": (1, 2, []),
            "reference_impl": (1, 1, ["--impl", "reference"]), "rows2": (1, 1, ["--budget", "80", "--rows", "2"])}
    res = {}
    for name, (tp, pp, extra) in runs.items():
        out = tmp_path / name
        torchrun("actor_worker.py", tp * pp, "step", tp, pp, tiny_qwen2, advantage_dir, out, *extra)
        res[name] = (json.loads((out / "loss.json").read_text()), load_file(str(out / "grads.safetensors")))
    base_loss, base = res["shared"]
    assert base_loss["tokens"] < res["unshared"][0]["tokens"]
    assert base_loss["abs_log_ratio"] > 0.1            # the ratio term is exercised
    for name in ("unshared", "tp2", "pp2", "reference_impl", "rows2"):
        loss, grads = res[name]
        assert loss["count"] == base_loss["count"]
        assert abs(loss["loss"] - base_loss["loss"]) <= 1e-5 * base_loss["loss"], name
        for k in base:
            rel = (grads[k] - base[k]).abs().max().item() / max(base[k].abs().max().item(), 1e-12)
            assert rel <= 3e-5, f"{name} {k}: {rel:.2e}"
    ref_loss, ref = _hf_reference(tiny_qwen2, advantage_dir)
    assert abs(ref_loss - base_loss["loss"]) <= 1e-5 * ref_loss
    for k in ref:
        rel = (base[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-12)
        assert rel <= 3e-5, f"vs transformers {k}: {rel:.2e}"


ACTOR = "actor: {beta: 0.3, lr: 1e-4, global_batch_actions: %d, token_budget: 256, epochs: 1, show_progress: false}\n"


@pytest.mark.dist
def test_actor_stage_resume_equals_uninterrupted(advantage_dir, tiny_qwen2, tmp_path):
    """`dapo-mcore train-actor CONFIG actor.max_steps=2` stops resumably (exit 2, no summary, stamp unfinished);
    the same command without it resumes: the same per-step losses and the bit-identical policy."""
    from conftest import run_cli, stage_run

    from dapo_mcore.models.convert import iter_hf_tensors

    full, part = tmp_path / "full", tmp_path / "part"
    cfgs = {r: stage_run(r, tiny_qwen2, ["actor"], {"advantage": advantage_dir}, ACTOR % 64) for r in (full, part)}
    run_cli("train-actor", cfgs[full])
    stop = run_cli("train-actor", cfgs[part], "actor.max_steps=2", check=False)
    assert stop.returncode == 2 and "stopped after max_steps (2/" in stop.stderr, stop.stderr[-2000:]
    assert not (part / "iter_0" / "actor" / "summary.json").exists()
    assert not json.loads((part / "iter_0" / "actor" / "stage.json").read_text())["finished"]
    run_cli("train-actor", cfgs[part])
    full, part = full / "iter_0" / "actor", part / "iter_0" / "actor"
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert len(la) >= 3 and [r["loss"] for r in la] == [r["loss"] for r in lb]
    a = {n: f() for n, f in iter_hf_tensors(full / "hf")}
    b = {n: f() for n, f in iter_hf_tensors(part / "hf")}
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((full / "summary.json").read_text())
    assert s["actions"] > 0 and s["last"]["loss"] < s["first"]["loss"] * 1.5
    assert json.loads((part / "stage.json").read_text())["finished"]


@pytest.mark.dist
def test_two_nodes_on_one_machine_tp2_actor_matches_single_process(advantage_dir, tiny_qwen2, tmp_path):
    """Two launcher processes (``scripts/launch_torchrun.sh --nnodes 2 --tp 2 -- dapo-mcore train-actor
    CONFIG``, node ranks 0 and 1, one process each) rendezvous on 127.0.0.1 and train the actor with TP=2
    across the "nodes" (the launcher appends --tp 2 to the stage command): every step's loss and the exported
    policy match a single-process TP=1 run, and rank 0 alone stamps the unit finished."""
    import os
    import socket
    import subprocess

    from conftest import run_cli, stage_run

    from dapo_mcore.models.convert import iter_hf_tensors

    root = Path(__file__).resolve().parent.parent
    single, two = tmp_path / "single", tmp_path / "two"
    cfgs = {r: stage_run(r, tiny_qwen2, ["actor"], {"advantage": advantage_dir}, ACTOR % 128) for r in (single, two)}
    run_cli("train-actor", cfgs[single])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "WORLD_", "RANK", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(["bash", str(root / "scripts" / "launch_torchrun.sh"), "--nnodes", "2", "--node-rank",
                               str(r), "--master-addr", "127.0.0.1", "--master-port", port, "--nproc-per-node", "1",
                               "--tp", "2", "--", "python", "-m", "dapo_mcore.cli", "train-actor", str(cfgs[two])],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    single, two = single / "iter_0" / "actor", two / "iter_0" / "actor"
    stamp = json.loads((two / "stage.json").read_text())
    assert stamp["finished"] and stamp["config"]["parallel"]["tensor_model_parallel_size"] == 2
    la = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) >= 2
    for a, b in zip(la, lb):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
        assert a["actions"] == b["actions"]
    wa = {n: f() for n, f in iter_hf_tensors(single / "hf")}
    wb = {n: f() for n, f in iter_hf_tensors(two / "hf")}
    assert set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4
