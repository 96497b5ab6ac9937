"""Smoke run of the whole chain on examples/configs/smoke.yaml (tiny toy model, a few problems): every
stage through the real code paths, caching of training stages, iterative hand-over, export, report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dapo_mcore.cli import main

torch.set_num_threads(1)
SMOKE = Path(__file__).resolve().parent.parent / "examples" / "configs" / "smoke.yaml"


def _status(run: Path) -> dict:
    return {k: v["status"] for k, v in json.loads((run / "timings.json").read_text()).items()}


def test_smoke_pipeline(tmp_path, capsys):
    run = tmp_path / "run"
    ov = [f"run.out_dir={run}"]
    assert main(["run", str(SMOKE), *ov]) == 0
    units = ["generate", "mc", "critic", "advantage", "actor", "advantage-outcome", "actor-outcome", "rft-generate",
             "rft", "eval"]
    assert _status(run) == {f"iter_0/{u}": "ran" for u in units}
    it = run / "iter_0"
    for u in ("critic", "actor", "actor-outcome", "rft"):
        assert (it / u / "hf" / "config.json").is_file() and (it / u / "summary.json").is_file()
    # RFT spends DAPO's generation budget (generate + mc samples) and trains on the correct samples only
    budget = sum(json.loads((it / s / "summary.json").read_text())["throughput"]["samples"] for s in ("generate", "mc"))
    rft_gen = json.loads((it / "rft-generate" / "summary.json").read_text())
    assert abs(rft_gen["throughput"]["samples"] - budget) <= rft_gen["problems"] / 2 + 1
    rft = json.loads((it / "rft" / "summary.json").read_text())["rft"]
    assert rft["samples"] == rft_gen["throughput"]["samples"] and rft["distinct_correct"] <= rft["correct"]
    cmp = json.loads((it / "eval" / "comparison.json").read_text())
    assert cmp["models"] == ["reference", "dapo", "outcome-only", "rft"]
    assert cmp["accuracy"]["reference"]["heldout"]["n"] == 16
    report = (run / "report.md").read_text()
    for needle in ("Before / after", "| generate | ran |", "Critic calibration", "advantage_hist.png",
                   "actor_loss.png", "## Resolved config", "beat the reference"):
        assert needle in report, needle
    assert (it / "actor_loss.png").stat().st_size > 1000

    # a damaged critic export is redone from its final checkpoint (no retraining); downstream stays valid
    metrics = (it / "critic" / "metrics.jsonl").read_text()
    shard = next((it / "critic" / "hf").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert main(["run", str(SMOKE), *ov]) == 0
    st = _status(run)
    assert st["iter_0/critic"] == "ran" and (it / "critic" / "metrics.jsonl").read_text() == metrics
    assert all(st[f"iter_0/{u}"] == "skipped" for u in units if u != "critic"), st
    assert "unreadable safetensors shard" in capsys.readouterr().out

    # iteration 1 generates with iteration 0's actor
    assert main(["generate", str(SMOKE), *ov, "run.iterations=2", "--iteration", "1"]) == 0
    stamp = json.loads((run / "iter_1" / "generate" / "stage.json").read_text())
    assert stamp["finished"] and stamp["config"]["model_path"] == str(it / "actor" / "hf")
    assert stamp["config"]["seed"] == 1000

    assert main(["export", str(SMOKE), *ov, "--iteration", "0", "--to", str(tmp_path / "final")]) == 0
    assert (tmp_path / "final" / "config.json").is_file()
    assert main(["export", str(SMOKE), *ov, "--iteration", "0", "--to", str(tmp_path / "final")]) == 2


@pytest.mark.slow
@pytest.mark.dist
def test_critic_under_torchrun(tmp_path):
    """run.nproc=2: the critic stage is launched as `torchrun ... -m dapo_mcore.cli _worker JOB` (DP=2)."""
    run = tmp_path / "run"
    ov = [f"run.out_dir={run}", "run.nproc=2", "run.stages=[generate, mc, critic]", "run.controls=[]"]
    assert main(["run", str(SMOKE), *ov]) == 0
    assert (run / "iter_0" / "critic.job.json").is_file()
    s = json.loads((run / "iter_0" / "critic" / "summary.json").read_text())
    assert s["steps"] > 0 and _status(run)["iter_0/critic"] == "ran"
    assert main(["run", str(SMOKE), *ov]) == 0 and _status(run)["iter_0/critic"] == "skipped"


def test_smoke_pipeline_emulating_the_gpu_configuration(tmp_path):
    """The whole chain with ``fast_paths.mode=emulate`` at DP=2: bf16 with fp32 main params, the distributed
    optimizer with overlapped grad reduce / param gather, THD critic batches, on CPU — what a user runs to
    check a cluster job's configuration on a laptop. (It caught DP-padding micro-batches of the actor that
    left the output weight without a gradient, which megatron's overlapped reduce requires every step.)"""
    run = tmp_path / "run"
    assert main(["run", str(SMOKE), f"run.out_dir={run}", "fast_paths.mode=emulate", "run.nproc=2",
                 "run.controls=[]"]) == 0
    it = run / "iter_0"
    for stage in ("critic", "actor"):
        paths = json.loads((it / stage / "summary.json").read_text())["paths"]
        assert paths["params_dtype"] == "bfloat16" and paths["distributed_optimizer"] and paths["overlap_grad_reduce"]
    assert json.loads((it / "critic" / "summary.json").read_text())["paths"]["packing"] == "thd"
    assert (json.loads((it / "eval" / "comparison.json").read_text())["models"] == ["reference", "dapo"])
