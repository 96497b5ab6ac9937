"""The pipeline owns the SGLang fleet (dapo_mcore/run/pipeline.py), without SGLang: the servers are
tests/sglang_fake_server.py, with ``FAKE_SGLANG_ENGINE=1`` answering ``/generate`` with the embedded engine on
the model it currently serves (so the stages get real samples of a real checkpoint). Checked: launched before
a rollout unit, stopped (processes gone) before every distributed unit and at the end, the weights swapped
between iterations and between eval's checkpoints, ``served_model`` in every rollout unit's stamp, a relaunch
when ``swap_weights`` is off, a mismatch on an external fleet refused before any request, and a unit whose
server changed model mid-stage left unfinished. The same against the real SGLang server:
tests/test_sglang_real.py (``scripts/test.sh --sglang``)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

from dapo_mcore.rollout import fleet as fleet_mod
from dapo_mcore.rollout.backend import GenRequest, SamplingParams
from dapo_mcore.rollout.fleet import Fleet, _group_members, checkpoint_version
from dapo_mcore.run import pipeline as pipeline_mod
from dapo_mcore.run.layout import PipelineError, read_stamp
from dapo_mcore.run.pipeline import Pipeline
from dapo_mcore.run.schema import load_run_config
from dapo_mcore.run.stages import STAGE
from dapo_mcore.tasks.toy import build_toy_completer, write_chain_problems

torch.set_num_threads(1)
FAKE = Path(__file__).resolve().parent / "sglang_fake_server.py"
SMOKE = Path(__file__).resolve().parent.parent / "examples" / "configs" / "smoke.yaml"
ROLLOUT_SECTIONS = ("generate", "mc", "eval")


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory) -> str:
    """An executable standing where SGLang's python would: the fake server, answering with the engine."""
    p = tmp_path_factory.mktemp("fake_sglang") / "python"
    p.write_text(f"#!/bin/sh\nFAKE_SGLANG_ENGINE=1 exec {sys.executable} {FAKE} \"$@\"\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory) -> str:
    """The same without the engine (no torch import: starts in a second) where no stage decodes samples."""
    p = tmp_path_factory.mktemp("plain_sglang") / "python"
    p.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    """The toy policy and problem sets, built once for the module."""
    d = tmp_path_factory.mktemp("toy")
    build_toy_completer(d / "policy", steps=40, seed=0)
    write_chain_problems(d / "train.jsonl", 6, seed=1)
    write_chain_problems(d / "heldout.jsonl", 6, seed=2)
    return {"policy": str(d / "policy"), "train": str(d / "train.jsonl"), "heldout": str(d / "heldout.jsonl")}


def _config(run: Path, fake_python: str, toy: dict, *extra: str):
    """The smoke config on the module's toy task, generate / mc / eval on a launched (fake) fleet."""
    fleet = [f"{s}.backend.{k}" for s in ROLLOUT_SECTIONS for k in ("kind=sglang", "launch=true", "port=0",
                                                                     "device=cpu", f"python={fake_python}",
                                                                     "launch_timeout_s=120", "stop_grace_s=5")]
    return load_run_config(SMOKE, [f"run.out_dir={run}", "run.iterations=2", "run.controls=[outcome]", "toy=null",
                                  f"model.policy={toy['policy']}", f"data.train={toy['train']}", f"data.eval.heldout={toy['heldout']}",
                                  "generate.num_samples=3", "mc.num_completions=2", "mc.max_new_tokens=24",
                                  "eval.max_new_tokens=24", *fleet, *extra])


class Watch:
    """Records every fleet launched and, at each distributed unit, whether any launched process was alive."""

    def __init__(self, monkeypatch):
        self.pgids: list[int] = []
        self.distributed: list[tuple[str, bool]] = []
        start, launch = Fleet.start, pipeline_mod.launch

        def recording_start(fleet, model):
            out = start(fleet, model)
            self.pgids += [s.pgid for s in fleet.servers]
            return out

        def checking_launch(stage, *a, **kw):
            if stage.distributed:
                self.distributed.append((stage.name, bool(fleet_mod._LIVE) or any(map(_group_members, self.pgids))))
            return launch(stage, *a, **kw)

        monkeypatch.setattr(Fleet, "start", recording_start)
        monkeypatch.setattr(pipeline_mod, "launch", checking_launch)


def test_two_iterations_on_a_launched_fleet(fake_python, toy, tmp_path, monkeypatch):
    run = tmp_path / "run"
    watch, lines = Watch(monkeypatch), []
    Pipeline(_config(run, fake_python, toy, *[f"{s}.backend.swap_weights=true" for s in ROLLOUT_SECTIONS]),
             log=lines.append).run(report=False)
    # stopped (every process gone) before every distributed unit, and at the end
    assert [n for n, _ in watch.distributed] == ["critic", "advantage", "actor", "advantage-outcome",
                                                 "actor-outcome"] * 2
    assert not any(alive for _, alive in watch.distributed), watch.distributed
    assert not fleet_mod._LIVE and not any(map(_group_members, watch.pgids))
    fleet_lines = [x.strip() for x in lines if x.strip().startswith("sglang: ") and " samples from " not in x]
    kinds = [x.split()[1] for x in fleet_lines]
    # iteration 0: launched for generate (mc reuses it), stopped before critic, launched for eval's reference
    # and swapped to dapo and outcome-only; iteration 1: generate swaps to iteration 0's actor, ...
    assert kinds == ["launching", "stopping", "launching", "swapping", "swapping", "swapping", "stopping",
                     "launching", "swapping", "swapping", "stopping"], fleet_lines
    assert len(watch.pgids) == 3
    actor0 = str(run / "iter_0" / "actor" / "hf")
    assert fleet_lines[5].endswith(f"-> {actor0} (generate, iteration 1)")
    for k in (0, 1):
        ref = toy["policy"] if k == 0 else actor0
        units = {u: run / f"iter_{k}" / u for u in ("generate", "mc")}
        units.update({f"eval/{label}": run / f"iter_{k}" / "eval" / label
                      for label in ("reference", "dapo", "outcome-only")})
        for name, d in units.items():
            st = read_stamp(d)
            model = st["config"].get("model_path") or {"eval/reference": ref,
                                                         "eval/dapo": str(run / f"iter_{k}" / "actor" / "hf"),
                                                         "eval/outcome-only": str(run / f"iter_{k}" / "actor-outcome" /
                                                                                  "hf")}[name]
            assert st["finished"] and st["served_model"] == {"model_path": model,
                                                             "weight_version": checkpoint_version(model)}, name
            if name in ("generate", "mc"):
                assert model == ref
        for u in ("critic", "advantage", "actor"):
            assert "served_model" not in read_stamp(run / f"iter_{k}" / u)
    cmp = json.loads((run / "iter_1" / "eval" / "comparison.json").read_text())
    assert cmp["models"] == ["reference", "dapo", "outcome-only"]
    # the fake engine server sampled the records: they are real solutions of the toy task
    gen = json.loads((run / "iter_1" / "generate" / "summary.json").read_text())
    assert gen["throughput"]["samples"] == 6 * 3 and gen["verifier"]["calls"] == 18
    # a re-run skips everything and launches nothing
    lines.clear()
    Pipeline(_config(run, fake_python, toy, *[f"{s}.backend.swap_weights=true" for s in ROLLOUT_SECTIONS]),
             log=lines.append).run(report=False)
    assert not any("sglang:" in x for x in lines) and len(watch.pgids) == 3


def _external(fleet: Fleet, *extra: str) -> list[str]:
    return [f"generate.backend.{k}" for k in ("kind=sglang", "launch=false", f"url={fleet.url}",
                                              "launch_timeout_s=30", *extra)]


def test_relaunch_without_swap_and_external_mismatch_refused(fake_python, plain_python, toy, tmp_path):
    """swap_weights off: a launched fleet serving another model is relaunched (the old processes gone);
    an external fleet serving another model is refused before any request, naming both models."""
    run = tmp_path / "run"
    pipe = Pipeline(_config(run, plain_python, toy, "run.iterations=1"), log=lambda s: None)
    pipe.prepare(echo=False)
    policy = pipe.policy(0)
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(policy).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    bcfg = pipe.cfg.eval.backend
    first = pipe.serve(bcfg, policy, "test")
    old = [s.pgid for s in first.servers]
    assert pipe.serve(bcfg, policy, "test") is first                # same model: kept
    second = pipe.serve(bcfg, str(other), "test")
    assert second is not first and not any(map(_group_members, old))
    assert second.served()[second.servers[0].url].model_path == str(other)
    pipe.stop_fleet()

    ext = Fleet(dataclasses.replace(bcfg, python=fake_python)).start(str(other))
    try:
        pipe = Pipeline(_config(run, fake_python, toy, "run.iterations=1", *_external(ext)), log=lambda s: None)
        with pytest.raises(PipelineError, match=f"(?s)stage generate .*model is {policy}.*serves {other}"):
            pipe.run_unit(0, "generate")
        assert httpx.get(f"{ext.url}/get_server_info").json()["generates"] == 0
        assert not read_stamp(run / "iter_0" / "generate")["finished"]
        assert pipe.fleet is not None and not pipe.fleet.launched
        assert ext.servers[0].alive()                                # an external fleet is never stopped
        # swap_weights on: the external fleet is swapped to the stage's model and the unit runs on it
        pipe = Pipeline(_config(run, fake_python, toy, "run.iterations=1", *_external(ext, "swap_weights=true")),
                        log=lambda s: None)
        pipe.run_unit(0, "generate")
        st = read_stamp(run / "iter_0" / "generate")
        assert st["finished"] and st["served_model"]["model_path"] == policy
        pipe.stop_fleet()
        assert ext.servers[0].alive()
    finally:
        ext.stop()


def test_served_model_changed_mid_stage_is_not_finished(plain_python, toy, tmp_path, monkeypatch):
    """The servers' weight version changes while the unit runs: it fails and its stamp stays unfinished."""
    run = tmp_path / "run"
    pipe = Pipeline(_config(run, plain_python, toy, "run.iterations=1"), log=lambda s: None)

    def generate_then_swap(cfg, out_dir, backend):
        backend.generate([GenRequest([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0.0))])
        for url in backend.fleet.worker_urls():
            httpx.post(f"{url}/update_weight_version", json={"new_version": "someone-else"})
        return {}

    monkeypatch.setitem(STAGE, "generate", dataclasses.replace(STAGE["generate"], run=generate_then_swap))
    with pytest.raises(PipelineError, match="(?s)not marked finished.*weight_version someone-else"):
        pipe.run_unit(0, "generate")
    st = read_stamp(run / "iter_0" / "generate")
    assert not st["finished"] and st["served_model"]["model_path"] == pipe.policy(0)
    pipe.stop_fleet()
    assert not fleet_mod._LIVE
