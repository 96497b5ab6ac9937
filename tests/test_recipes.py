"""The GPU recipes parse, carry the paper's hyper-parameters, and their layouts split the real models."""
from __future__ import annotations

from pathlib import Path

import pytest

from dapo_mcore.run.schema import load_run_config
from dapo_mcore.plan.presets import resolve_model

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
OV = ["model.policy=/ckpt", "data.train=/data/train.jsonl", "data.eval.math500=/data/math500.jsonl"]


@pytest.mark.parametrize("name,preset,beta", [("qwen2.5-math-7b-math.yaml", "Qwen2.5-Math-7B", 0.01),
                                              ("qwen2.5-72b-instruct-math.yaml", "Qwen2.5-72B", 0.02)])
def test_recipe(name, preset, beta):
    c = load_run_config(RECIPES / name, OV)
    assert (c.generate.num_samples, c.generate.keep, c.mc.num_completions) == (128, 6, 16)
    assert (c.critic.lr, c.critic.global_batch, c.critic.epochs) == (5e-6, 512, 1)
    assert (c.actor.lr, c.actor.global_batch_actions, c.actor.beta) == (5e-7, 2048, beta)
    assert c.advantage.gap_threshold == 0.1 and c.eval.max_new_tokens == 2048
    assert c.generate.verifier == "math" and c.generate.backend.kind == "sglang"
    _, arch = resolve_model(preset)
    for stage in (c.critic, c.advantage, c.actor):
        p = stage.parallel
        arch.check_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        assert c.run.nproc % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size) == 0
