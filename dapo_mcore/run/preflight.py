"""Preflight: what a run can check before it spends compute, checked all at once.

:func:`preflight` is called by ``dapo-mcore run`` before the first stage and by a stage command before its
stage (``Pipeline.prepare``). It collects every problem of the units it is given and raises one
:class:`PreflightError` listing them all:

- **layouts**: every distributed unit's ``<section>.parallel`` against the processes it will get (the world
  size ``run.nproc`` x nodes, or torchrun's ``WORLD_SIZE``, must be a multiple of TP x PP x CP; the rules of
  ``ParallelConfig.validate``) and against every model it builds (the checkpoints its ``model`` fills name,
  a unit's own future output standing for the checkpoint it is initialised from): TP divides the attention
  heads, KV heads, vocabulary and MLP width, PP the layers, EP the experts (``ArchSpec.check_parallel``);
- **checkpoints**: ``model.policy`` and ``model.critic_init`` are HF checkpoints this project builds (config
  supported, safetensors index and shards present);
- **problem files**: ``data.train`` (when a generating unit runs) and every ``data.eval`` set (when eval runs)
  are read whole and every bad row is reported as ``file:line: what is wrong`` (``generate.skip_bad_rows``
  lets the training set's bad rows through);
- **SGLang fleets**: every rollout or eval unit on ``backend.kind: sglang`` (``Fleet.preflight``: an external
  fleet is reachable and serves the iteration's reference or may swap to it; a launched one can be started).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from dapo_mcore.data.problems import ProblemSetError, read_problems
from dapo_mcore.models.hf_config import ModelConfigError, load_arch
from dapo_mcore.parallel.runtime import ParallelConfigError
from dapo_mcore.rollout.fleet import Fleet, FleetError
from dapo_mcore.run.checks import verify_hf_checkpoint
from dapo_mcore.run.launch import Cluster, LayoutError, inside_torchrun, processes
from dapo_mcore.run.layout import PipelineError, RunLayout
from dapo_mcore.run.stages import CHECKPOINT, EVAL, STAGE, Stage


class PreflightError(PipelineError):
    """Everything the preflight found wrong, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"preflight found {len(problems)} problem(s) before any compute:\n"
                         + "\n".join(f"  - {p}" for p in problems))


@dataclass
class _Preview:
    """What a stage's fills read (:class:`dapo_mcore.run.pipeline.Plan`), for iteration 0 and without
    requiring upstream outputs: a unit's output directory is only named, not checked."""

    cfg: Any
    ref: str
    train_set: str
    layout: RunLayout
    k: int = 0
    seed: int = 0

    def output(self, unit: str) -> Path:
        return self.layout.unit(0, unit)


def _models(stage: Stage, plan: _Preview, cfg: Any) -> list[tuple[str, str]]:
    """``(field, checkpoint)`` of every model ``stage`` builds in iteration 0. A checkpoint a unit of this run
    writes (``<unit>/hf``) stands for the checkpoint that unit starts from, whose architecture it keeps; later
    iterations' references are iteration 0's actor, of the policy's architecture."""
    out = []
    for name, fill in stage.fills.items():
        if fill.kind != "model":
            continue
        path = fill.value(plan)
        seen = set()
        while path:
            p = Path(path)
            unit = STAGE.get(p.parent.name) if p.name == "hf" and p.parent.parent == plan.layout.iteration(0) else None
            if unit is None or unit.output != CHECKPOINT or unit.name in seen:
                break
            seen.add(unit.name)
            path = unit.fills["init_path"].value(plan) if "init_path" in unit.fills else ""
        if path:
            out.append((name, str(path)))
    return out


def _check_models(paths: dict[str, str], errors: list[str]) -> dict[str, Any]:
    """Load the architecture of every named checkpoint (``key -> path``); problems go to ``errors``."""
    archs = {}
    for key, path in paths.items():
        if not path:
            continue
        if not Path(path).is_dir():
            errors.append(f"{key}: {path}: no such checkpoint directory")
            continue
        try:
            verify_hf_checkpoint(path)
            archs[path] = load_arch(path)
        except (PipelineError, ModelConfigError, FileNotFoundError) as e:
            errors.append(f"{key}: {e}")
    return archs


def _check_layout(stage: Stage, cfg: Any, models: list[tuple[str, str]], archs: dict[str, Any], nproc: int,
                  cluster: Cluster, errors: list[str]) -> None:
    par = cfg.parallel
    sec = f"{stage.section}.parallel"
    try:
        if inside_torchrun():
            world = int(os.environ["WORLD_SIZE"])
        else:
            world = processes(par, nproc, cluster)[1]
        par.validate(world, cuda=_cuda())
    except (LayoutError, ParallelConfigError) as e:
        errors.append(f"stage {stage.name}: {sec}: {e}")
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    for field, path in models:
        arch = archs.get(path)
        if arch is None:
            continue
        for key, args in ((f"{sec}.tensor_model_parallel_size={tp}", (tp, 1, 1)),
                          (f"{sec}.pipeline_model_parallel_size={pp}", (1, pp, 1)),
                          (f"{sec}.expert_model_parallel_size={ep}", (1, 1, ep))):
            try:
                arch.check_parallel(*args)
            except ModelConfigError as e:
                errors.append(f"stage {stage.name}: {key}: {e}, in the model of {stage.section}.{field} ({path})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_problems(key: str, path: str, skip_bad_rows: bool, errors: list[str]) -> None:
    if not path:
        return
    try:
        pset = read_problems(path, skip_bad_rows=True)
    except ProblemSetError as e:
        errors.append(f"{key}: {e}")
        return
    if pset.skipped and not skip_bad_rows:
        errors.append(f"{key}: {len(pset.skipped)} bad row(s) of {len(pset.skipped) + len(pset.problems)}"
                      + ("; set generate.skip_bad_rows=true to skip them" if key == "data.train" else "")
                      + "".join(f"\n      {s}" for s in pset.skipped))


def preflight(cfg: Any, units: Iterable[Stage], *, policy: str, train_set: str, eval_sets: dict[str, str],
              cluster: Optional[Cluster] = None, served: Optional[str] = None, iterations: int = 1) -> None:
    """Check ``units`` of a run (config ``cfg``, a :class:`dapo_mcore.run.schema.RunConfig`) whose iteration-0
    reference is ``policy`` and problem sets ``train_set`` / ``eval_sets``; raise :class:`PreflightError`
    listing every problem. ``served``: the model an SGLang fleet must serve first (default ``policy``);
    ``iterations``: how many iterations this call runs (more than one needs a fleet that can change model)."""
    cluster = cluster or Cluster()
    units = list(units)
    layout = RunLayout(Path(cfg.run.out_dir))
    errors: list[str] = []
    plan = _Preview(cfg, policy, train_set, layout)
    archs = _check_models({"model.policy": policy, "model.critic_init": cfg.model.critic_init or ""}, errors)

    for stage in units:
        scfg = getattr(cfg, stage.section)
        if stage.distributed:
            models = _models(stage, plan, scfg)
            archs.update(_check_models({f"{stage.section}.{f}": p for f, p in models if p not in archs
                                        and p not in (policy, cfg.model.critic_init)}, errors))
            _check_layout(stage, scfg, models, archs, cfg.run.nproc, cluster, errors)
    if any("problems" in s.fills for s in units):
        _check_problems("data.train", train_set, cfg.generate.skip_bad_rows, errors)
    if any(s.output == EVAL for s in units):
        for name, path in eval_sets.items():
            _check_problems(f"data.eval.{name}", path, False, errors)

    for section in dict.fromkeys(s.section for s in units):
        backend = getattr(getattr(cfg, section), "backend", None)
        if backend is None or backend.kind != "sglang":
            continue
        key = f"{section}.backend"
        if not backend.launch and not backend.swap_weights and iterations > 1:
            errors.append(f"{key}: the external fleet at {backend.url} serves one model, but this run has "
                          f"{iterations} iterations and iteration k+1 samples from iteration k's actor; set "
                          f"{key}.swap_weights=true (or {key}.launch=true)")
        try:
            with Fleet(backend) as fleet:
                fleet.preflight(served or policy)
        except FleetError as e:
            errors.append(f"{key}: {e}")
    if errors:
        raise PreflightError(list(dict.fromkeys(errors)))


__all__ = ["preflight", "PreflightError"]
