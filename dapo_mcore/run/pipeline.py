"""The DAPO stage graph: per iteration, the units of the stage table (:mod:`dapo_mcore.run.stages`) that the
config asks for, in table order, each in ``<out>/iter_<k>/<unit>``.

Every unit is stamped (:mod:`dapo_mcore.run.stamps`). On re-run a unit is

- **skipped** when its stamp is finished, its digest equals the one computed now, and its outputs check
  out (:mod:`dapo_mcore.run.checks`: complete manifests whose every shard matches its size and sha256;
  ``summary.json`` and an ``hf/`` whose index loads and lists only shards that hold the listed tensors;
  one result row per problem);
- **resumed** when its stamp has the same digest but is not finished or its outputs fail the check (the
  stages resume internally: finished shards and training checkpoints are kept);
- **recomputed from scratch** (its directory deleted) when the digest differs (config or input changed).

Iteration k+1 uses iteration k's actor ``hf/`` as reference, generator and completer. Distributed units run
in this process when they need one process, else as a torchrun job (:mod:`dapo_mcore.run.launch`).

The SGLang fleet: a ``rollout`` unit (the stage table's field: generate, mc, rft-generate, eval) whose
``backend.kind`` is ``sglang`` samples from a fleet the pipeline holds across units
(:mod:`dapo_mcore.rollout.fleet`). ``backend.launch: true``: the pipeline starts the servers for the unit's model
(logs in ``<out>/sglang/``) and stops them, waiting until their processes are gone, before any distributed
unit runs (the GPUs are shared: never both at once) and at the end of the run; a later rollout unit whose
model differs (iteration k+1's generator is iteration k's actor; eval's checkpoints) gets it swapped in
(``swap_weights: true``: ``/update_weights_from_disk`` + ``/flush_cache``) or the fleet relaunched. ``launch:
false``: the external fleet at ``url`` must serve the unit's model, else it is swapped (``swap_weights``) or the
unit stops before any request with an error naming both models. Each such unit's ``stage.json`` records
``served_model`` (``model_path``, ``weight_version``); a unit whose servers changed model mid-stage is not
marked finished.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dapo_mcore.config import identity, to_dict
from dapo_mcore.data.shards import atomic_write_json, file_sha256
from dapo_mcore.eval.evaluate import load_results
from dapo_mcore.eval.table import comparison_markdown, write_comparison
from dapo_mcore.parallel.runtime import process_group_scope
from dapo_mcore.rollout.backend_config import BackendConfig
from dapo_mcore.rollout.fleet import Fleet, FleetError, SGLangError, same_model, serving
from dapo_mcore.run import stamps
from dapo_mcore.run.checks import check_outputs
from dapo_mcore.run.launch import Head, inside_torchrun, is_writer, launch
from dapo_mcore.run.layout import STAMP, PipelineError, RunLayout, finished, read_stamp
from dapo_mcore.run.preflight import preflight
from dapo_mcore.run.report import write_report
from dapo_mcore.run.schema import RunConfig, dump_config
from dapo_mcore.run.stages import EVAL, NEXT_REFERENCE, STAGE, STAGES, Stage
from dapo_mcore.tasks.toy import build_toy_completer, write_chain_problems


@dataclass
class StageResult:
    iteration: int
    stage: str
    status: str        # "ran" | "skipped"
    seconds: float
    note: str = ""


class Plan:
    """What the fills of one iteration read (:class:`dapo_mcore.run.stages.Fill`), and the identities of the
    upstream outputs they used."""

    def __init__(self, pipe: "Pipeline", k: int):
        self.cfg: RunConfig = pipe.cfg
        self.k = k
        self.ref = pipe.policy(k)
        self.seed = pipe.cfg.run.seed + 1000 * k
        self.train_set = pipe.train_set
        self._layout = pipe.layout
        self.used: dict[str, dict] = {}

    def output(self, unit: str) -> Path:
        """The directory of a finished upstream unit (its identity joins the inputs); else PipelineError."""
        path = self._layout.unit(self.k, unit)
        self.used[unit] = stamps.output_identity(path)
        return path


class Pipeline:
    """One run directory. ``prepare()`` resolves inputs (building the toy task when configured) and saves the
    resolved config; ``run()`` runs every configured unit of every iteration."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print, head: Optional[Head] = None):
        self.cfg = cfg
        self.head = head         # the multi-node session when this is node 0 of several (run/launch.py)
        self.layout = RunLayout(Path(cfg.run.out_dir))
        self.out = self.layout.out
        self.log = log
        self.writer = is_writer()
        self.results: list[StageResult] = []
        self.policy0 = cfg.model.policy
        self.train_set = cfg.data.train
        self.eval_sets = dict(cfg.data.eval)
        self._prepared = False
        self.fleet: Optional[Fleet] = None     # the SGLang fleet of the rollout units (module doc)

    # -- set-up --------------------------------------------------------------------------------
    def prepare(self, echo: bool = True, units: Optional[list[Stage]] = None, iteration: Optional[int] = None) -> None:
        """Create the run directory, build the toy task if configured, print and save the config, and check
        everything before compute (run/preflight.py): the whole run, or ``units`` of ``iteration``."""
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            text = dump_config(self.cfg)
            self.layout.config.write_text(text)
            if echo:
                self.log(f"resolved config (saved to {self.layout.config}):\n{text}")
        if self.cfg.toy is not None:
            self._build_toy()
        preflight(self.cfg, self.units() if units is None else units, policy=self.policy0, train_set=self.train_set,
                  eval_sets=self.eval_sets, cluster=self.head.cluster if self.head else None,
                  served=None if iteration is None else self.policy(iteration),
                  iterations=self.cfg.run.iterations if iteration is None else 1)
        self._prepared = True

    def _build_toy(self) -> None:
        t = self.cfg.toy
        d = self.layout.toy
        train, held = d / "train.jsonl", d / "heldout.jsonl"
        self.policy0, self.train_set, self.eval_sets = str(d / "policy"), str(train), {"heldout": str(held)}
        if not self.writer:      # a torchrun rank: rank 0 alone builds; this rank needs it built already
            if not (held.is_file() and (d / "policy" / "toy_completer.json").is_file()):
                raise PipelineError(f"{d}: the toy task is not built; build it first in one process "
                                    "(`dapo-mcore run CONFIG run.stages=[]`)")
            return
        d.mkdir(parents=True, exist_ok=True)
        ops = (t.min_ops, t.max_ops)
        t0 = time.perf_counter()
        build_toy_completer(d / "policy", steps=t.sft_steps, seed=t.seed, carry_error_rate=t.carry_error_rate,
                            n_ops=ops)
        for path, n, seed in ((train, t.train_problems, t.seed + 1), (held, t.eval_problems, t.seed + 2)):
            write_chain_problems(path, n, seed=seed, n_ops=ops)
        self.log(f"[toy] policy {self.policy0}, {t.train_problems} train / {t.eval_problems} held-out problems "
                 f"({time.perf_counter() - t0:.1f} s)")

    # -- the graph -----------------------------------------------------------------------------
    def policy(self, k: int) -> str:
        """Reference policy (generator, completer, actor init) of iteration ``k``."""
        return self.policy0 if k == 0 else str(self.layout.unit(k - 1, NEXT_REFERENCE) / "hf")

    def units(self, k: int = 0) -> list[Stage]:
        """The units of iteration ``k``, in table order: the chosen stages and the chosen controls' units (in
        iteration 0 only with ``run.controls_first_only``)."""
        r = self.cfg.run
        controls = r.controls if k == 0 or not r.controls_first_only else []
        return [s for s in STAGES if (s.control is None and s.name in r.stages) or s.control in controls]

    def plan(self, k: int, stage: Stage) -> tuple[Any, list[str], dict]:
        """``(filled config, positional input dirs + out dir, input identity)`` of a unit in iteration ``k``."""
        p = Plan(self, k)
        values = {name: fill.value(p) for name, fill in stage.fills.items()}
        cfg = dataclasses.replace(getattr(self.cfg, stage.section), **values)
        args = [str(p.output(u)) for u in stage.inputs] + [str(self.layout.unit(k, stage.name))]
        ident: dict = dict(p.used)
        for name, fill in stage.fills.items():
            if fill.kind == "model" and values[name]:
                ident[name] = stamps.model_identity(values[name])
            elif fill.kind == "file":
                ident[name] = file_sha256(values[name])
        return cfg, args, ident

    # -- running -------------------------------------------------------------------------------
    def _begin(self, path: Path, name: str, kind: str, dig: str, cfg: Any, ident: dict,
               force: bool) -> Optional[StageResult]:
        """A skipped result for a finished unit; else (re)start it: stamp it unfinished, clearing a stale one."""
        state = "stale" if force and path.exists() else stamps.status(path, dig, lambda d: check_outputs(kind, d),
                                                                     self.log)
        if state == "done":
            return StageResult(-1, name, "skipped", json.loads((path / STAMP).read_text()).get("seconds", 0.0))
        if self.writer:
            if state == "stale":
                self.log(f"  {path}: config or inputs changed; recomputing from scratch")
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
            stamps.begin(path, name, dig, to_dict(cfg), ident)
        return None

    def run_unit(self, k: int, name: str, force: bool = False) -> StageResult:
        if not self._prepared:
            self.prepare(echo=False)
        stage = STAGE[name]
        if stage.output == EVAL:
            return self.run_eval(k, force=force)
        path = self.layout.unit(k, name)
        cfg, args, ident = self.plan(k, stage)
        dig = stamps.digest({"stage": name, "config": identity(cfg), "inputs": ident})
        skipped = self._begin(path, name, stage.output, dig, cfg, ident, force)
        if skipped:
            self.log(f"[iter {k}] {name}: finished earlier, outputs verified; skipped")
            return self._record(dataclasses.replace(skipped, iteration=k))
        self.log(f"[iter {k}] {name}: running -> {path}")
        t0 = time.perf_counter()
        try:
            if self._on_fleet(stage, cfg):
                res = self._run_on_fleet(stage, k, cfg, cfg.model_path, args, path)
            else:
                if stage.distributed:
                    self.stop_fleet(f"before {name} (distributed)")
                res = launch(stage, cfg, args, self.layout.job(path), self.cfg.run.nproc, self.log, self.head)
        except ValueError as e:   # the stages raise ValueError for bad settings / unusable data
            raise PipelineError(f"stage {name} (iteration {k}) failed: {e}") from None
        if isinstance(res, dict) and res.get("partial"):
            raise PipelineError(f"{path}: stage {name} stopped after max_steps ({res.get('steps')}/"
                                f"{res.get('total_steps')} steps); re-run to continue")
        sec = time.perf_counter() - t0
        if self.writer:
            check_outputs(stage.output, path)
            stamps.finish(path, sec)
        return self._record(StageResult(k, name, "ran", sec))

    def eval_models(self, k: int) -> dict[str, str]:
        """Label -> checkpoint compared in iteration ``k``'s eval (reference first, then the table's labels)."""
        models = {"reference": self.policy(k)}
        for s in self.units(k):
            if s.label and finished(self.layout.unit(k, s.name)):
                models[s.label] = str(self.layout.unit(k, s.name) / "hf")
        return models

    def run_eval(self, k: int, force: bool = False, models: Optional[dict[str, str]] = None,
                 out: Optional[Path] = None) -> StageResult:
        """Evaluate every model of the iteration (each cached in ``eval/<label>/``) and compare them."""
        if inside_torchrun():
            raise PipelineError("evaluation runs in one process: run it outside torchrun")
        stage = next(s for s in STAGES if s.output == EVAL)
        p = Plan(self, k)
        ecfg = dataclasses.replace(getattr(self.cfg, stage.section),
                                   **{name: fill.value(p) for name, fill in stage.fills.items()})
        models = models or self.eval_models(k)
        out = out or self.layout.unit(k, stage.name)
        sets_id = {n: file_sha256(path) for n, path in self.eval_sets.items()}
        results, total, ran = {}, 0.0, False
        for label, path in models.items():
            sub = out / label
            ident = {"model": stamps.model_identity(path), "sets": sets_id}
            dig = stamps.digest({"stage": stage.name, "config": identity(ecfg), "inputs": ident})
            skipped = self._begin(sub, stage.name, EVAL, dig, ecfg, ident, force)
            if skipped:
                self.log(f"[iter {k}] eval {label}: finished earlier; skipped")
                total += skipped.seconds
            else:
                self.log(f"[iter {k}] eval {label}: {path}")
                t0 = time.perf_counter()
                args = [path, self.eval_sets, str(sub)]
                if self._on_fleet(stage, ecfg):   # one model after another on the fleet: swapped or relaunched
                    self._run_on_fleet(stage, k, ecfg, path, args, sub, f"eval {label}")
                else:
                    stage.run(ecfg, *args)
                check_outputs(EVAL, sub)
                sec = time.perf_counter() - t0
                stamps.finish(sub, sec)
                total, ran = total + sec, True
            results[label] = load_results(sub)
        write_comparison(results, out)
        self.log(comparison_markdown(json.loads((out / "comparison.json").read_text())))
        return self._record(StageResult(k, stage.name, "ran" if ran else "skipped", total))

    # -- the SGLang fleet ------------------------------------------------------------------------
    def _on_fleet(self, stage: Stage, cfg: Any) -> bool:
        """Whether the unit samples from the pipeline's SGLang fleet (a rollout unit with ``kind: sglang``)."""
        return stage.rollout and cfg.backend.kind == "sglang" and not inside_torchrun()

    def serve(self, bcfg: BackendConfig, model: str, why: str) -> Fleet:
        """The fleet a unit with backend ``bcfg`` samples ``model`` from: the one held if it fits (same fleet
        settings; launched: it serves ``model`` already, or ``swap_weights`` will swap it in), else a new one
        (launched for ``model``, or the external one at ``url``)."""
        f = self.fleet
        if f is not None and not f.serves_config(bcfg):
            self.stop_fleet(f"{why} uses other fleet settings")
        elif f is not None and f.launched and not bcfg.swap_weights and not same_model(f.model_path, model):
            self.stop_fleet(f"{why} needs {model} (it serves {f.model_path}; swap_weights is off: relaunching)")
        if self.fleet is None:
            f = Fleet(bcfg, log_dir=bcfg.log_dir or self.layout.fleet_logs)
            if bcfg.launch:
                self.log(f"  sglang: launching {bcfg.servers} server(s) for {model} ({why}); logs in {f.log_dir}")
                f.start(model)
            self.fleet = f
        elif self.fleet.launched and not same_model(self.fleet.model_path, model):
            self.log(f"  sglang: swapping the fleet's weights {self.fleet.model_path} -> {model} ({why})")
        return self.fleet

    def stop_fleet(self, why: str = "") -> None:
        """Stop the fleet the pipeline launched (returns once its processes are gone); forget an external one."""
        f, self.fleet = self.fleet, None
        if f is not None:
            if f.launched:
                self.log(f"  sglang: stopping the fleet" + (f" ({why})" if why else ""))
            f.close()

    def _run_on_fleet(self, stage: Stage, k: int, cfg: Any, model: str, args: list, path: Path,
                      what: str = "") -> Any:
        """Run a rollout unit on the fleet serving ``model``; its stamp records ``served_model``."""
        what = what or stage.name
        where = f"stage {what} (iteration {k})"
        try:
            fleet = self.serve(cfg.backend, model, f"{what}, iteration {k}")
            with serving(cfg.backend, model, fleet=fleet) as backend:
                served = backend.served_model.as_dict()
                self.log(f"  sglang: {what} samples from {served['model_path']} (weight_version "
                         f"{served['weight_version']}) at {fleet.url}")
                if self.writer:
                    stamps.record(path, served_model=served)
                return stage.run(cfg, *args, backend=backend)
        except FleetError as e:      # ModelMismatch included: raised before any request
            raise PipelineError(f"{where}: {e}") from None
        except SGLangError as e:     # ServedModelChanged included: the unit is not marked finished
            raise PipelineError(f"{where} failed on SGLang (not marked finished; a re-run resumes it): {e}") from None

    def _record(self, r: StageResult) -> StageResult:
        self.results.append(r)
        if self.writer:
            old = json.loads(self.layout.timings.read_text()) if self.layout.timings.is_file() else {}
            old[f"iter_{r.iteration}/{r.stage}"] = dataclasses.asdict(r)
            atomic_write_json(self.layout.timings, old)
        return r

    def run(self, iterations: Optional[int] = None, report: bool = True,
            after_unit: Optional[Callable[[int, str], None]] = None) -> list[StageResult]:
        """Run every unit of every iteration (skipping finished ones), then stop the SGLang fleet and write the
        report. ``after_unit(k, name)`` is called after each unit (the fleet, :attr:`fleet`, still up)."""
        if inside_torchrun():
            raise PipelineError("`dapo-mcore run` launches its own torchrun jobs: start it in one process (a torchrun "
                                "job runs one distributed stage: `dapo-mcore train-critic CONFIG`, ...)")
        if not self._prepared:
            self.prepare()
        n_iter = iterations or self.cfg.run.iterations
        try:
            with process_group_scope():      # the group an in-process distributed stage leaves behind
                for k in range(n_iter):
                    for stage in self.units(k):
                        self.run_unit(k, stage.name)
                        if after_unit is not None:
                            after_unit(k, stage.name)
                    if k + 1 < n_iter and not finished(self.layout.unit(k, NEXT_REFERENCE)):
                        raise PipelineError(f"iteration {k + 1} needs iteration {k}'s {NEXT_REFERENCE}, which was "
                                            "not trained")
        finally:
            self.stop_fleet("the run ended")
        if report:
            self.log(f"report: {write_report(self.out)}")
        return self.results


__all__ = ["Pipeline", "Plan", "StageResult", "PipelineError", "read_stamp"]
