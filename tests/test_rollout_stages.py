"""generate + mc stages: records, kill-and-resume equality, bad input stops before compute."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dapo_mcore.data.problems import ProblemSetError
from dapo_mcore.data.shards import iter_records, load_manifest
from dapo_mcore.generate.stage import GenerateConfig, run_generate, select_balanced
from dapo_mcore.mc.stage import MCConfig, run_mc
from dapo_mcore.tasks.toy import build_toy_completer, write_chain_problems

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return build_toy_completer(tmp_path_factory.getbasetemp() / "toy_completer", steps=100)


def gen_cfg(toy, problems, **kw):
    base = dict(num_samples=6, keep=3, max_new_tokens=48, shard_size=2, batch_requests=2, show_progress=False)
    base.update(kw)
    return GenerateConfig(str(problems), str(toy), **base)


def mc_cfg(toy, **kw):
    base = dict(num_completions=4, max_new_tokens=40, shard_size=3, batch_requests=2, show_progress=False)
    base.update(kw)
    return MCConfig(str(toy), **base)


@pytest.fixture(scope="module")
def solutions(toy, tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    probs = write_chain_problems(d / "problems.jsonl", 5, seed=1)
    run_generate(gen_cfg(toy, probs), d / "gen")
    return d


def test_select_balanced():
    assert select_balanced([1, 1, 1, 0, 0, 0], 4) == [0, 1, 3, 4]
    assert select_balanced([1, 0, 0, 0, 0, 0], 4) == [0, 1, 2, 3]
    assert select_balanced([1, 1, 1, 1, 0, 1], 4) == [0, 1, 2, 4]
    assert select_balanced([0, 0], 4) == [0, 1]


def test_generate_records(solutions):
    recs = list(iter_records(solutions / "gen"))
    assert [r["problem_id"] for r in recs] == [f"p{i:06d}" for i in range(5)]
    for r in recs:
        assert r["num_samples"] == 6 and len(r["rewards"]) == 6 and len(r["solutions"]) == 3
        assert r["num_correct"] == sum(x > 0.5 for x in r["rewards"])
        for s in r["solutions"]:
            assert s["reward"] == r["rewards"][s["sample_index"]] and s["output_ids"]
    summary = json.loads((solutions / "gen" / "summary.json").read_text())
    assert summary["throughput"]["samples"] == 30 and summary["verifier"]["calls"] == 30
    assert load_manifest(solutions / "gen")["complete"]


def test_mc_records(toy, solutions, tmp_path):
    from transformers import AutoTokenizer

    from dapo_mcore.verify import ExactMatchVerifier

    summary = run_mc(mc_cfg(toy), solutions / "gen", tmp_path / "mc")
    recs = list(iter_records(tmp_path / "mc"))
    gen = {r["problem_id"]: r for r in iter_records(solutions / "gen")}
    tok = AutoTokenizer.from_pretrained(toy)
    v = ExactMatchVerifier()
    assert len(recs) == summary["states"] and len({r["state_id"] for r in recs}) == len(recs)
    firsts = {r["problem_id"] for r in recs if r["num_steps"] == 0}
    assert firsts == set(gen)                                   # every problem has its prompt-only state
    for r in recs:
        g = gen[r["problem_id"]]
        assert r["prompt_ids"] == g["prompt_ids"]
        state_tokens = [t for s in r["step_ids"] for t in s]
        if r["terminal"]:
            assert r["num_completions"] == 0 and r["actions"] == []
            sol = next(s for s in g["solutions"] if s["output_ids"] == state_tokens)
            assert r["value"] == sol["reward"]
            continue
        # exact tokenisation: the state's steps are a prefix of one kept solution's output ids
        assert any(s["output_ids"][:len(state_tokens)] == state_tokens for s in g["solutions"])
        assert r["num_completions"] == 4 == len(r["actions"])
        rewards = [c["reward"] for c in r["completions"]]
        assert isinstance(r["value"], float) and r["value"] == pytest.approx(sum(rewards) / 4)
        head = tok.decode(state_tokens, skip_special_tokens=True)
        for c, a in zip(r["completions"], r["actions"]):
            assert c["reward"] == v.verify(head + tok.decode(c["output_ids"], skip_special_tokens=True), g["answer"])
            assert c["output_ids"][:len(a["ids"])] == a["ids"]
            if a["ends_solution"]:
                assert a["ids"] == c["output_ids"] and a["reward"] == c["reward"] and c["finish"] == "stop"
            else:
                assert a["reward"] is None
    assert summary["throughput"]["cache_hit_rate"] > 0.5


_RUNNER = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from dapo_mcore.mc.stage import MCConfig, run_mc
cfg = MCConfig({toy!r}, num_completions=4, max_new_tokens=40, shard_size=2, batch_requests=1, show_progress=False)
run_mc(cfg, {gen!r}, {out!r})
"""


def test_mc_kill_and_resume_gives_same_records(toy, solutions, tmp_path):
    """SIGKILL the mc stage after some shards, leave a stray temp file, resume: the records equal
    an uninterrupted run's (no state lost or duplicated)."""
    cfg = mc_cfg(toy, shard_size=2, batch_requests=1)
    full_summary = run_mc(cfg, solutions / "gen", tmp_path / "full")
    full = list(iter_records(tmp_path / "full"))
    n_shards = load_manifest(tmp_path / "full")["num_shards"]
    assert n_shards >= 4

    out = tmp_path / "killed"
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER.format(root=os.getcwd(), toy=str(toy), gen=str(solutions / "gen"), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(json.loads((out / "manifest.json").read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = load_manifest(out)
    assert not m["complete"] and 2 <= len(m["shards"]) < n_shards, "the run was not killed mid-way"
    (out / "shard-00099.parquet.tmp-12345").write_bytes(b"half written")      # debris of a killed write
    summary = run_mc(cfg, solutions / "gen", out)
    assert summary["shards_computed"] == n_shards - len(m["shards"])
    resumed = list(iter_records(out))
    assert resumed == full
    # the summary counts the whole output, the killed run's shards too (the RFT budget and the report's
    # token accounting read it); only the cache hits may differ (the resumed engine starts cold)
    for key in ("samples", "prompt_tokens", "completion_tokens"):
        assert summary["throughput"][key] == full_summary["throughput"][key], key
    assert summary["verifier"] == full_summary["verifier"]
    assert summary["counted_shards"] == n_shards
    # a re-run of a finished stage computes nothing and still counts everything
    again = run_mc(cfg, solutions / "gen", out)
    assert again["shards_computed"] == 0 and again["throughput"]["samples"] == full_summary["throughput"]["samples"]


def test_generate_resume_after_lost_shard(toy, solutions, tmp_path):
    probs = solutions / "problems.jsonl"
    first = run_generate(gen_cfg(toy, probs), tmp_path / "g")
    before = list(iter_records(tmp_path / "g"))
    (tmp_path / "g" / "shard-00001.parquet").unlink()
    s = run_generate(gen_cfg(toy, probs), tmp_path / "g")
    assert s["shards_computed"] == 1 and list(iter_records(tmp_path / "g")) == before
    assert s["verifier"] == first["verifier"]                  # counts the reused shards too
    assert s["throughput"]["completion_tokens"] == first["throughput"]["completion_tokens"]
    assert before == list(iter_records(solutions / "gen"))     # same config, other dir: same records


def test_bad_problem_row_stops_before_compute(toy, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "47:+8\\n", "answer": "55"}\n{"id": "b", "prompt": "x"}\n')
    with pytest.raises(ProblemSetError, match=r"p\.jsonl:2: missing field"):
        run_generate(gen_cfg(toy, p), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    s = run_generate(gen_cfg(toy, p, skip_bad_rows=True), tmp_path / "out")
    assert s["bad_rows_skipped"] == 1 and s["problems"] == 1


def test_changed_config_is_refused(toy, solutions, tmp_path):
    from dapo_mcore.data.shards import ShardError

    run_mc(mc_cfg(toy, num_completions=2), solutions / "gen", tmp_path / "mc")
    with pytest.raises(ShardError, match="use another output directory"):
        run_mc(mc_cfg(toy, num_completions=3), solutions / "gen", tmp_path / "mc")
