"""Preflight (dapo_mcore/run/preflight.py): every layout against every model, every checkpoint, every problem
file (all bad rows at once) and the SGLang fleets, checked before the first stage, in one error."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from dapo_mcore.cli import main
from dapo_mcore.run.launch import Cluster
from dapo_mcore.run.pipeline import Pipeline
from dapo_mcore.run.preflight import PreflightError, preflight
from dapo_mcore.run.schema import load_run_config
from dapo_mcore.run.stages import STAGE
from dapo_mcore.tasks.tiny import TinyModelConfig, build_tiny_checkpoint

torch.set_num_threads(1)
GOOD = [{"id": f"p{i}", "prompt": f"1 + {i} =", "answer": str(1 + i)} for i in range(4)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny Qwen2: 4 attention heads, 2 KV heads, 4 layers, vocabulary 320, MLP 176."""
    d = tmp_path_factory.mktemp("tiny") / "policy"
    build_tiny_checkpoint(d, ["1 + 2 = 3", "2 + 2 = 4"], TinyModelConfig())
    assert json.loads((d / "config.json").read_text())["num_attention_heads"] == 4
    return d


def _problems(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, ckpt: Path, *ov: str, train: list | None = None):
    train_file = _problems(tmp_path / "train.jsonl", GOOD if train is None else train)
    eval_file = _problems(tmp_path / "eval.jsonl", GOOD)
    return load_run_config(None, [f"run.out_dir={tmp_path / 'run'}", f"model.policy={ckpt}",
                                  f"data.train={train_file}", f"data.eval.held={eval_file}", "run.controls=[]", *ov])


def _check(cfg, units=None, cluster=None, iterations=1):
    pipe = Pipeline(cfg)
    preflight(cfg, pipe.units() if units is None else units, policy=cfg.model.policy, train_set=cfg.data.train,
              eval_sets=dict(cfg.data.eval), cluster=cluster, iterations=iterations)


def test_a_good_run_passes(tmp_path, ckpt):
    _check(_cfg(tmp_path, ckpt, "run.nproc=2", "critic.parallel.tensor_model_parallel_size=2",
                "actor.parallel.pipeline_model_parallel_size=2"))


def test_critic_tp3_on_a_four_head_model_fails_before_any_stage(tmp_path, ckpt, capsys):
    """The issue's case: it used to spend generate and mc, then fail with 'exit 1' under torchrun."""
    cfg = _cfg(tmp_path, ckpt, "run.nproc=3", "critic.parallel.tensor_model_parallel_size=3")
    with pytest.raises(PreflightError) as e:
        _check(cfg)
    msg = str(e.value)
    assert "stage critic: critic.parallel.tensor_model_parallel_size=3: tensor parallel size 3 does not divide " \
           "num_attention_heads=4" in msg and f"critic.init_path ({ckpt})" in msg
    # through the CLI: one error, exit 2, and nothing computed (no iteration directory)
    ov = [f"run.out_dir={tmp_path / 'cli'}", f"model.policy={ckpt}", f"data.train={cfg.data.train}",
          "run.controls=[]", "run.stages=[generate, mc, critic]", "run.nproc=3",
          "critic.parallel.tensor_model_parallel_size=3"]
    assert main(["run", str(_yaml(tmp_path)), *ov]) == 2
    err = capsys.readouterr().err
    assert "preflight found 1 problem(s)" in err and "num_attention_heads=4" in err
    assert not (tmp_path / "cli" / "iter_0").exists()
    # a single stage command runs the same preflight for its stage
    assert main(["train-critic", str(_yaml(tmp_path)), *ov]) == 2
    assert "stage critic: critic.parallel.tensor_model_parallel_size=3" in capsys.readouterr().err


def _yaml(tmp_path: Path) -> Path:
    p = tmp_path / "empty.yaml"
    p.write_text("run: {seed: 0}\n")
    return p


def test_every_problem_at_once(tmp_path, ckpt):
    """Bad problem rows (all of them, file:line), a missing eval set, PP not dividing the layers, KV heads
    not divisible, a world size that TP x PP does not divide, a missing critic checkpoint: one error."""
    train = [GOOD[0], "{not json", {"id": "p1", "prompt": "x"}, GOOD[1], {"id": "p0", "prompt": "y", "answer": 1},
             {"id": "p9", "prompt": "", "answer": "2"}]
    cfg = _cfg(tmp_path, ckpt, "run.nproc=3", "actor.parallel.pipeline_model_parallel_size=3",
               "advantage.parallel.tensor_model_parallel_size=2", f"model.critic_init={tmp_path / 'nope'}",
               train=train)
    cfg.data.eval["missing"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(PreflightError) as e:
        _check(cfg)
    msg, train_file = str(e.value), cfg.data.train
    for needle in (f"data.train: 4 bad row(s) of 6; set generate.skip_bad_rows=true",
                   f"{train_file}:2: invalid JSON", f"{train_file}:3: missing field(s) answer",
                   f"{train_file}:5: duplicate id 'p0'", f"{train_file}:6: field 'prompt' must be a non-empty string",
                   f"data.eval.missing: {tmp_path / 'missing.jsonl'}: no such problem-set file",
                   "stage actor: actor.parallel.pipeline_model_parallel_size=3: pipeline parallel size 3 does not "
                   "divide num_hidden_layers=4",
                   "stage advantage: advantage.parallel: run.nproc=3 is not a multiple of the model-parallel size "
                   "TP x PP x CP = 2",
                   f"model.critic_init: {tmp_path / 'nope'}: no such checkpoint directory"):
        assert needle in msg, (needle, msg)
    assert f"{train_file}:1:" not in msg and f"{train_file}:4:" not in msg
    # skip_bad_rows lets the training set's bad rows through (they are counted by the stage)
    cfg.generate.skip_bad_rows = True
    with pytest.raises(PreflightError) as e:
        _check(cfg)
    assert "data.train" not in str(e.value)


def test_kv_heads_experts_and_nodes(tmp_path, ckpt):
    """TP=4 divides the 4 heads but not the 2 KV heads; EP on a dense model; a world of 2 nodes x 1 process
    that TP=4 cannot split; all with the stage and field named."""
    cfg = _cfg(tmp_path, ckpt, "run.nproc=4", "critic.parallel.tensor_model_parallel_size=4",
               "actor.parallel.expert_model_parallel_size=2")
    with pytest.raises(PreflightError) as e:
        _check(cfg)
    msg = str(e.value)
    assert "stage critic: critic.parallel.tensor_model_parallel_size=4: tensor parallel size 4 does not divide " \
           "num_key_value_heads=2" in msg
    assert "stage actor: actor.parallel.expert_model_parallel_size=2: expert parallel size 2 given for a dense " \
           "model (qwen2)" in msg
    cfg = _cfg(tmp_path, ckpt, "run.nproc=1", "actor.parallel.tensor_model_parallel_size=4")
    with pytest.raises(PreflightError) as e:
        _check(cfg, [STAGE["actor"]], cluster=Cluster(nnodes=2))
    assert "stage actor: actor.parallel: 2 nodes x run.nproc=1 = 2 is not a multiple of the model-parallel " \
           "size TP x PP x CP = 4" in str(e.value)
    _check(_cfg(tmp_path, ckpt, "run.nproc=1", "actor.parallel.tensor_model_parallel_size=2"), [STAGE["actor"]],
           cluster=Cluster(nnodes=2))


def test_advantage_checks_the_critic_it_will_score_with(tmp_path, ckpt):
    """advantage builds the critic (critic/hf, not trained yet: it has model.critic_init's architecture) and the
    reference: a critic_init of 2 heads refuses advantage TP=4 there, naming advantage.critic_path."""
    small = tmp_path / "critic_init"
    build_tiny_checkpoint(small, ["1 + 2 = 3"], TinyModelConfig(hidden_size=32, intermediate_size=96, num_heads=2,
                                                                num_kv_heads=2, num_layers=2))
    cfg = _cfg(tmp_path, ckpt, "run.nproc=2", f"model.critic_init={small}",
               "advantage.parallel.pipeline_model_parallel_size=2", "critic.parallel.pipeline_model_parallel_size=2")
    _check(cfg)
    cfg = _cfg(tmp_path, ckpt, "run.nproc=4", f"model.critic_init={small}",
               "advantage.parallel.pipeline_model_parallel_size=4")
    with pytest.raises(PreflightError) as e:
        _check(cfg, [STAGE["advantage"]])
    msg = str(e.value)
    assert f"pipeline parallel size 4 does not divide num_hidden_layers=2, in the model of advantage.critic_path " \
           f"({small})" in msg
    assert "in the model of advantage.reference_path" not in msg      # the 4-layer reference splits in 4


def test_checkpoints_of_the_wrong_kind(tmp_path, ckpt):
    """A policy directory that is no HF checkpoint, and one whose shard is truncated."""
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    cfg = _cfg(tmp_path, ckpt)
    cfg.model.policy = str(empty)
    with pytest.raises(PreflightError, match=r"model.policy: .*empty_ckpt: not an HF checkpoint \(no config.json\)"):
        _check(cfg)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    cfg.model.policy = str(broken)
    with pytest.raises(PreflightError, match="model.policy: .*unreadable safetensors shard"):
        _check(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_fleet_and_a_fleet_that_cannot_follow_the_iterations(tmp_path, ckpt):
    url = f"http://127.0.0.1:{_free_port()}"
    cfg = _cfg(tmp_path, ckpt, "generate.backend.kind=sglang", f"generate.backend.url={url}")
    with pytest.raises(PreflightError) as e:
        _check(cfg, [STAGE["generate"], STAGE["rft-generate"]], iterations=2)
    msg = str(e.value)
    assert msg.count("generate.backend:") == 2, msg       # one reachability error for the section, one iterations
    assert f"generate.backend: the external fleet at {url} serves one model, but this run has 2 iterations" in msg
    assert f"generate.backend: SGLang fleet at {url} not healthy after 10.0 s" in msg and "unreachable" in msg
