"""The run configuration: ``run``, ``model``, ``data`` and ``toy`` sections, one section per stage config of
the stage table (:data:`dapo_mcore.run.stages.SECTIONS`), and a run-wide ``fast_paths``.

Loading is strict (:mod:`dapo_mcore.config`): unknown keys and wrong types are errors naming the file and
line or the override. The fields the pipeline fills (:data:`dapo_mcore.run.stages.FILLED`) are refused
with where their value comes from, and left out of the saved ``config.yaml`` (it loads back unchanged).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from dapo_mcore.config import (Checked, ConfigError, apply_overrides, build, flatten_keys, option, read_yaml, to_dict,
                               where)
from dapo_mcore.parallel.fast_paths import FastPathConfig
from dapo_mcore.parallel.runtime import ParallelConfigError
from dapo_mcore.run.stages import CONTROLS, FILLED, MAIN, SECTIONS, STAGES
from dapo_mcore.sft.rft import BUDGETS

DISTRIBUTED_SECTIONS = tuple(dict.fromkeys(s.section for s in STAGES if s.distributed))   # with ``parallel``


@dataclass
class RunSection(Checked):
    out_dir: str = option("runs/dapo", "the run directory")
    seed: int = option(0, "seed of every stage (+1000 per iteration)")
    iterations: int = option(1, "DAPO iterations: iteration k+1's reference is iteration k's actor", ge=1)
    nproc: int = option(1, "processes of the distributed stages (raised to a stage's TP x PP x CP)", ge=1)
    stages: list[str] = option(factory=lambda: list(MAIN), doc=f"stages per iteration, in order; of {list(MAIN)}")
    controls: list[str] = option(factory=list, doc=f"controls per iteration, of {list(CONTROLS)}: outcome (advantages "
                                                   "from the MC outcomes, no critic), rft (rejection-sampling "
                                                   "fine-tuning on the same generation budget)")
    controls_first_only: bool = option(False, "run the controls in iteration 0 only (iterative DAPO against "
                                              "one-shot controls)")
    budget: str = option("samples", "how RFT's generation budget matches DAPO's generate + mc: samples (each "
                                    "sample counts one) | tokens (the generated tokens)", choices=BUDGETS)
    outcome_beta: Optional[float] = option(None, "beta of the outcome-only control's actor (default: actor.beta)", gt=0)


@dataclass
class ModelSection:
    policy: str = option("", "HF checkpoint of the reference policy (iteration 0's generator and completer)")
    critic_init: Optional[str] = option(None, "HF checkpoint the critic starts from (default: the reference)")


@dataclass
class DataSection:
    train: str = option("", "training problem set (JSONL or parquet with id / prompt / answer)")
    eval: dict[str, str] = option(factory=dict, doc="held-out problem sets by name")


@dataclass
class ToySection(Checked):
    """Build a tiny chain-task policy and problem sets under ``<out_dir>/toy`` (CPU smoke runs and demos);
    then ``model.policy`` / ``data.train`` / ``data.eval`` stay empty."""

    train_problems: int = option(64, "training problems", ge=1)
    eval_problems: int = option(64, "held-out problems", ge=1)
    sft_steps: int = option(150, "fine-tuning steps of the toy policy", ge=1)
    carry_error_rate: float = option(0.5, "how often the toy policy's training data drops a carry", ge=0, le=1)
    min_ops: int = option(3, "operations per problem, at least", ge=1)
    max_ops: int = option(5, "operations per problem, at most", ge=1)
    seed: int = option(0, "seed of the toy task and policy")


RunConfig = dataclasses.make_dataclass("RunConfig", [
    ("run", RunSection, option(factory=RunSection, doc="the run")),
    ("model", ModelSection, option(factory=ModelSection, doc="the reference policy")),
    ("data", DataSection, option(factory=DataSection, doc="problem sets")),
    ("toy", Optional[ToySection], option(None, "build a toy task and policy instead of model/data")),
    *[(name, typ, option(factory=typ, doc=f"the {name} stage")) for name, typ in SECTIONS.items()],
    ("fast_paths", Optional[FastPathConfig], option(None, "the fast-path switch of every distributed stage that "
                                                          "does not set its own <section>.parallel.fast_paths")),
], namespace={"__doc__": "A whole run: the run/model/data/toy sections and one section per stage config."})
RunConfig.__module__ = __name__
OPTIONAL_SECTIONS = ("toy", "fast_paths")


def load_run_config(path: Optional[str | Path], overrides: list[str] = (), *,
                    allow_filled: bool = False) -> RunConfig:
    """Read ``path`` (YAML; may be None), apply ``key=value`` overrides, validate; return the config."""
    data: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        data, lines = read_yaml(path)
        origins = {k: f"{path}:{ln}" for k, ln in lines.items()}
    apply_overrides(data, origins, list(overrides))
    if not allow_filled:
        for key in flatten_keys(data, ""):
            if key in FILLED:
                raise ConfigError(f"{where(key, origins)}{key!r} is filled by the pipeline from {FILLED[key]}; "
                                  "do not set it")
    cfg = build(RunConfig, data, origins)
    _apply_fast_paths(cfg, data)
    validate(cfg)
    return cfg


def _apply_fast_paths(cfg: RunConfig, data: dict) -> None:
    """Copy the run-level ``fast_paths`` into every distributed stage section that does not set its own."""
    if cfg.fast_paths is None:
        return
    for name in DISTRIBUTED_SECTIONS:
        own = (((data.get(name) or {}).get("parallel") or {}).get("fast_paths")) is not None
        if not own:
            getattr(cfg, name).parallel.fast_paths = dataclasses.replace(cfg.fast_paths)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks (raise ConfigError naming the key)."""
    r = cfg.run
    bad = [s for s in r.stages if s not in MAIN]
    if bad:
        raise ConfigError(f"run.stages: unknown stage(s) {bad}; choose from {list(MAIN)}")
    bad = [c for c in r.controls if c not in CONTROLS]
    if bad:
        raise ConfigError(f"run.controls: unknown control(s) {bad}; choose from {list(CONTROLS)}")
    for name in DISTRIBUTED_SECTIONS:
        try:
            getattr(cfg, name).parallel.paths(cuda=None)
        except ParallelConfigError as e:
            raise ConfigError(f"{name}.parallel.fast_paths: {e}") from None
    if cfg.toy is not None:
        for key, v in (("model.policy", cfg.model.policy), ("data.train", cfg.data.train),
                       ("data.eval", cfg.data.eval)):
            if v:
                raise ConfigError(f"{key} is set together with the toy section; the toy section builds it")
        if cfg.toy.min_ops > cfg.toy.max_ops or cfg.toy.min_ops < 1:
            raise ConfigError(f"toy.min_ops/max_ops: need 1 <= min_ops <= max_ops, got {cfg.toy.min_ops}/"
                              f"{cfg.toy.max_ops}")
    else:
        if not cfg.model.policy:
            raise ConfigError("model.policy is required (an HF checkpoint), or add a toy section")
        if not cfg.data.train and "generate" in r.stages:
            raise ConfigError("data.train is required (a problem set), or add a toy section")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (pipeline-filled fields omitted, so it loads back unchanged)."""
    d = to_dict(cfg)
    for key in FILLED:
        sec, _, name = key.partition(".")
        d[sec].pop(name, None)
    for name in OPTIONAL_SECTIONS:
        if d.get(name) is None:
            d.pop(name, None)
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=True)


__all__ = ["RunConfig", "RunSection", "ModelSection", "DataSection", "ToySection", "load_run_config", "validate",
           "dump_config"]
