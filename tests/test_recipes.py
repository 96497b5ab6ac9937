"""The GPU recipes parse, carry the paper's hyper-parameters, their layouts split the real models on the
allocation they name, and they run through `dapo-mcore run` (no direct module calls)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dapo_mcore.plan.presets import resolve_model
from dapo_mcore.run.launch import Cluster, processes
from dapo_mcore.run.schema import load_run_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"
OV = ["model.policy=/ckpt", "data.train=/data/train.jsonl", "data.eval.math500=/data/math500.jsonl"]


@pytest.mark.parametrize("name,preset,beta,nodes", [("qwen2.5-math-7b-math.yaml", "Qwen2.5-Math-7B", 0.01, 1),
                                                    ("qwen2.5-72b-instruct-math.yaml", "Qwen2.5-72B", 0.02, 4)])
def test_recipe(name, preset, beta, nodes):
    c = load_run_config(RECIPES / name, OV)
    assert (c.generate.num_samples, c.generate.keep, c.mc.num_completions) == (128, 6, 16)
    assert (c.critic.lr, c.critic.global_batch, c.critic.epochs) == (5e-6, 512, 1)
    assert (c.actor.lr, c.actor.global_batch_actions, c.actor.beta) == (5e-7, 2048, beta)
    assert c.advantage.gap_threshold == 0.1 and c.eval.max_new_tokens == 2048
    assert c.generate.verifier == "math"
    for b in (c.generate.backend, c.mc.backend, c.eval.backend):       # the pipeline owns the fleet
        assert b.kind == "sglang" and b.launch and b.servers * b.tp * b.dp == c.run.nproc == 8
    _, arch = resolve_model(preset)
    for stage in (c.critic, c.advantage, c.actor):
        p = stage.parallel
        arch.check_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        _, world = processes(p, c.run.nproc, Cluster(nnodes=nodes))
        assert world == 8 * nodes and world % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size) == 0


def test_no_direct_stage_module_calls():
    """Recipes, the SLURM script and the docs run stages through `dapo-mcore` (stamps, skip, resume, checks)."""
    files = [*RECIPES.iterdir(), ROOT / "scripts" / "slurm_dapo.sbatch", ROOT / "scripts" / "launch_torchrun.sh",
             ROOT / "docs" / "scale.md", ROOT / "docs" / "cli.md", ROOT / "README.md"]
    pat = re.compile(r"python3? -m dapo_mcore\.(critic|actor|advantage|generate|mc|eval|sft)\b")
    hits = [f"{f.name}: {m.group(0)}" for f in files for m in pat.finditer(f.read_text())]
    assert not hits, hits


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each YAML under examples/ is accepted as written (its values inside every declared bound); the paths
    its launcher fills in are given here, except for a config with a toy section (which builds them)."""
    has_toy = any(line.startswith("toy:") for line in path.read_text().splitlines())
    c = load_run_config(path, [] if has_toy else OV)
    assert c.run.out_dir and (c.toy is not None) == has_toy
