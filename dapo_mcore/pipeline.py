"""The DAPO stage graph: per iteration ``<out>/iter_<k>/{generate,mc,critic,advantage,actor,eval}``.

Every stage directory gets a ``stage.json`` stamp: the stage's full config and the identity of its
inputs (upstream shard checksums, checkpoint files) hashed into ``digest``, ``finished`` and the
compute ``seconds``. On re-run a stage is

- **skipped** when its stamp is finished, its digest equals the one computed now, and its outputs
  check out: sharded stages (generate, mc, advantage) have a complete manifest whose every shard
  matches its size and sha256; training stages (critic, actor) have ``summary.json`` and an ``hf/``
  checkpoint whose index loads and lists only shards that exist and hold the listed tensors; eval
  has ``results.json`` and one row per problem;
- **resumed** when its stamp has the same digest but is not finished or its outputs fail the check
  (the stages resume internally: finished shards and training checkpoints are kept, corrupt
  shards and a missing export are recomputed);
- **recomputed from scratch** (its directory deleted) when the digest differs (config or input
  changed).

Iteration k+1 uses iteration k's actor ``hf/`` as reference, generator and completer. Controls
(``run.controls``): ``outcome`` runs ``advantage-outcome`` + ``actor-outcome`` (advantages from the
MC completions' outcomes instead of the critic); ``rft`` runs ``rft-generate`` (the reference samples
each training problem with the same total generation budget as DAPO's generate + mc stages) and ``rft``
(SFT of the reference on its distinct verified-correct samples, ``rft`` config section).

Distributed stages (critic, advantage, actor) run in-process (a 1-process group) when they need one
process, else under ``torchrun --standalone`` with ``python -m dapo_mcore.cli _worker JOB``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dapo_mcore.config import RunConfig, dump_config, section_types, to_dict
from dapo_mcore.data.shards import atomic_write_json, file_sha256, input_identity, load_manifest

STAMP = "stage.json"
DISTRIBUTED = ("critic", "advantage", "actor", "rft")
# Fields that do not change a stage's results (excluded from its digest).
NON_IDENTITY = {"show_progress", "tensorboard", "max_steps", "save_interval", "batch_requests"}
# Input paths the pipeline fills: their content identity is in the digest's inputs, not their location.
PATH_FIELDS = {"problems", "model_path", "init_path", "critic_path", "reference_path"}


class PipelineError(RuntimeError):
    """A stage cannot run (missing input, failed worker, bad checkpoint); the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Output checks and identities


def verify_hf_checkpoint(path: str | Path) -> dict:
    """Check an HF checkpoint directory: ``config.json`` parses, the safetensors index (or the single
    ``model.safetensors``) loads, every listed shard exists and holds the tensors the index names.
    Returns ``{"files": {name: bytes}, "headers": sha256 of the shard headers}``; raises PipelineError."""
    from safetensors import safe_open

    d = Path(path)
    if not (d / "config.json").is_file():
        raise PipelineError(f"{d}: not an HF checkpoint (no config.json)")
    try:
        json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{d / 'config.json'}:{e.lineno}: invalid JSON ({e.msg})") from None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PipelineError(f"{index}: corrupt index ({e})") from None
        if not wmap:
            raise PipelineError(f"{index}: empty weight_map")
    elif (d / "model.safetensors").is_file():
        wmap = None
    else:
        raise PipelineError(f"{d}: no model.safetensors or model.safetensors.index.json")
    files = sorted(set(wmap.values())) if wmap else ["model.safetensors"]
    h = hashlib.sha256()
    sizes = {}
    for f in files:
        fp = d / f
        if not fp.is_file():
            raise PipelineError(f"{fp}: shard listed in the index is missing")
        try:
            with safe_open(str(fp), framework="pt") as sf:
                keys = set(sf.keys())
        except Exception as e:  # noqa: BLE001 - any unreadable shard is a corrupt checkpoint
            raise PipelineError(f"{fp}: unreadable safetensors shard ({e})") from None
        if wmap:
            missing = [k for k, v in wmap.items() if v == f and k not in keys]
            if missing:
                raise PipelineError(f"{fp}: tensors {missing[:3]} listed in the index are missing")
        with open(fp, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
        sizes[f] = fp.stat().st_size
    return {"files": sizes, "headers": h.hexdigest()[:16]}


def model_identity(path: str | Path) -> dict:
    """What identifies a checkpoint as an input: its files and headers, plus the digest of the stage
    that produced it (``../stage.json``) when it is one of this pipeline's outputs."""
    ident = dict(verify_hf_checkpoint(path))
    stamp = Path(path).parent / STAMP
    if stamp.is_file():
        ident["stage_digest"] = json.loads(stamp.read_text()).get("digest")
    return ident


def verify_sharded(path: str | Path) -> None:
    """A complete manifest whose every shard file matches its recorded size and sha256."""
    from dapo_mcore.data.shards import ShardError

    try:
        m = load_manifest(path)
    except ShardError as e:
        raise PipelineError(str(e)) from None
    if not m["complete"]:
        raise PipelineError(f"{path}: stage output is not complete")
    if m.get("num_shards") is not None and len(m["shards"]) != m["num_shards"]:
        raise PipelineError(f"{path}: manifest lists {len(m['shards'])} of {m['num_shards']} shards")
    for key, e in m["shards"].items():
        fp = Path(path) / e["file"]
        if not fp.is_file() or fp.stat().st_size != e["bytes"] or file_sha256(fp) != e["sha256"]:
            raise PipelineError(f"{fp}: shard {key} missing or corrupt")


def _stage_identity(cfg: Any) -> Any:
    """The config fields that change a stage's results (paths excluded: inputs are identified by content)."""
    d = cfg.identity() if hasattr(cfg, "identity") else to_dict(cfg)
    if isinstance(d, dict):
        d = {k: v for k, v in d.items() if k not in NON_IDENTITY | PATH_FIELDS}
    return d


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Stage execution (also the torchrun worker's entry)


def _fn(stage: str) -> Callable:
    if stage == "generate":
        from dapo_mcore.rollout.generate import run_generate
        return run_generate
    if stage == "mc":
        from dapo_mcore.rollout.mc import run_mc
        return run_mc
    if stage == "critic":
        from dapo_mcore.critic.train import run_train_critic
        return run_train_critic
    if stage == "advantage":
        from dapo_mcore.actor.advantage import run_advantage
        return run_advantage
    if stage == "actor":
        from dapo_mcore.actor.train import run_train_actor
        return run_train_actor
    if stage == "rft":
        from dapo_mcore.sft.train import run_rft
        return run_rft
    raise PipelineError(f"unknown stage function {stage!r}")


def execute(kind: str, cfg: Any, args: list[str], kwargs: Optional[dict] = None) -> Any:
    """Run one stage function in this process (``kind``: generate/mc/critic/advantage/actor)."""
    return _fn(kind)(cfg, *args, **(kwargs or {}))


def write_job(path: Path, kind: str, cfg: Any, args: list[str]) -> None:
    atomic_write_json(path, {"kind": kind, "config_type": f"{type(cfg).__module__}.{type(cfg).__qualname__}",
                             "config": to_dict(cfg), "args": [str(a) for a in args]})


def run_job(path: str | Path) -> Any:
    """Load a job file written by :func:`write_job` and execute it (on every torchrun rank)."""
    import importlib

    from dapo_mcore.config import build

    job = json.loads(Path(path).read_text())
    mod, _, name = job["config_type"].rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    return execute(job["kind"], build(cls, job["config"]), job["args"])


def torchrun_command(nproc: int, job: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dapo_mcore.cli", "_worker", str(job)]


# ---------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    iteration: int
    stage: str
    status: str        # "ran" | "skipped" | "not run"
    seconds: float
    note: str = ""


class Pipeline:
    """One run directory. ``prepare()`` resolves inputs (building the toy task when configured) and
    saves the resolved config; ``run()`` runs every configured stage of every iteration."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.log = log
        self.results: list[StageResult] = []
        self.policy0 = cfg.model.policy
        self.train_set = cfg.data.train
        self.eval_sets = dict(cfg.data.eval)
        self._prepared = False

    # -- set-up --------------------------------------------------------------------------------
    def prepare(self, echo: bool = True) -> None:
        """Create the run directory, build the toy task if configured, print and save the config."""
        self.out.mkdir(parents=True, exist_ok=True)
        text = dump_config(self.cfg)
        (self.out / "config.yaml").write_text(text)
        if echo:
            self.log(f"resolved config (saved to {self.out / 'config.yaml'}):\n{text}")
        if self.cfg.toy is not None:
            self._build_toy()
        for name, path in [("data.train", self.train_set)] + [(f"data.eval.{k}", v) for k, v in self.eval_sets.items()]:
            if path and not Path(path).is_file():
                raise PipelineError(f"{name}: {path}: no such problem-set file")
        if not Path(self.policy0).is_dir():
            raise PipelineError(f"model.policy: {self.policy0}: no such checkpoint directory")
        self._prepared = True

    def _build_toy(self) -> None:
        from dapo_mcore.rollout.toy import build_toy_completer, write_chain_problems

        t = self.cfg.toy
        d = self.out / "toy"
        d.mkdir(parents=True, exist_ok=True)
        ops = (t.min_ops, t.max_ops)
        t0 = time.perf_counter()
        self.policy0 = str(build_toy_completer(d / "policy", steps=t.sft_steps, seed=t.seed,
                                               carry_error_rate=t.carry_error_rate, n_ops=ops))
        train, held = d / "train.jsonl", d / "heldout.jsonl"
        for path, n, seed in ((train, t.train_problems, t.seed + 1), (held, t.eval_problems, t.seed + 2)):
            write_chain_problems(path, n, seed=seed, n_ops=ops)
        self.train_set, self.eval_sets = str(train), {"heldout": str(held)}
        self.log(f"[toy] policy {self.policy0}, {t.train_problems} train / {t.eval_problems} held-out problems "
                 f"({time.perf_counter() - t0:.1f} s)")

    # -- layout --------------------------------------------------------------------------------
    def iter_dir(self, k: int) -> Path:
        return self.out / f"iter_{k}"

    def stage_dir(self, k: int, stage: str) -> Path:
        return self.iter_dir(k) / stage

    def policy(self, k: int) -> str:
        """Reference policy (generator, completer, actor init) of iteration ``k``."""
        return self.policy0 if k == 0 else str(self.stage_dir(k - 1, "actor") / "hf")

    def units(self, k: int = 0) -> list[str]:
        """The stage units of iteration ``k``, in order (main stages, then controls, then eval)."""
        st = self.cfg.run.stages
        u = [s for s in ("generate", "mc", "critic", "advantage", "actor") if s in st]
        controls = self.cfg.run.controls if (k == 0 or not self.cfg.run.controls_first_only) else []
        if "outcome" in controls:
            u += ["advantage-outcome", "actor-outcome"]
        if "rft" in controls:
            u += ["rft-generate", "rft"]
        if "eval" in st:
            u += ["eval"]
        return u

    def nproc(self, cfg: Any) -> int:
        par = getattr(cfg, "parallel", None)
        mp = 1
        if par is not None:
            mp = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
        n = max(self.cfg.run.nproc, mp)
        if n % mp:
            raise PipelineError(f"run.nproc={self.cfg.run.nproc} is not a multiple of the model-parallel size {mp}")
        return n

    # -- stage configs ---------------------------------------------------------------------------
    def _fill(self, cfg: Any, **values) -> Any:
        names = {f.name for f in dataclasses.fields(cfg)}
        return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in names})

    def stage_plan(self, k: int, unit: str) -> tuple[str, Any, list[str], dict]:
        """``(kind, filled config, positional input dirs (+ out dir last), input identity)``."""
        c, seed, ref = self.cfg, self.cfg.run.seed + 1000 * k, self.policy(k)
        d = lambda s: self.stage_dir(k, s)  # noqa: E731
        if unit == "generate":
            cfg = self._fill(c.generate, problems=self.train_set, model_path=ref, seed=seed)
            return "generate", cfg, [str(d(unit))], {"problems": file_sha256(self.train_set),
                                                     "model": self._model_id(ref)}
        if unit == "mc":
            cfg = self._fill(c.mc, model_path=ref, seed=seed, verifier=c.generate.verifier,
                             verify_timeout_s=c.generate.verify_timeout_s)
            return "mc", cfg, [str(d("generate")), str(d(unit))], {"generate": self._shard_id(d("generate")),
                                                                    "model": self._model_id(ref)}
        if unit == "critic":
            init = c.model.critic_init or ref
            cfg = self._fill(c.critic, init_path=init, seed=seed)
            return "critic", cfg, [str(d("mc")), str(d(unit))], {"mc": self._shard_id(d("mc")),
                                                                  "init": self._model_id(init)}
        if unit in ("advantage", "advantage-outcome"):
            self._require_type("advantage")
            outcome = unit.endswith("outcome")
            if outcome and "source" not in {f.name for f in dataclasses.fields(c.advantage)}:
                raise PipelineError("control 'outcome' needs AdvantageConfig.source ('critic' | 'outcome'), "
                                    "which this version of dapo_mcore.actor.advantage does not have")
            critic = "" if outcome else str(d("critic") / "hf")
            cfg = self._fill(c.advantage, source="outcome" if outcome else "critic", critic_path=critic,
                             reference_path=ref, seed=seed)
            ident = {"mc": self._shard_id(d("mc")), "ref": self._model_id(ref)}
            if not outcome:
                self._check_done_input(d("critic"))
                ident["critic"] = self._model_id(critic)
            return "advantage", cfg, [str(d("mc")), str(d(unit))], ident
        if unit in ("actor", "actor-outcome"):
            self._require_type("actor")
            adv = d("advantage" + unit[len("actor"):])
            cfg = self.actor_config(unit, ref, seed)
            return "actor", cfg, [str(adv), str(d(unit))], {"advantage": self._output_id(adv),
                                                           "init": self._model_id(ref)}
        if unit == "rft-generate":
            # the same generation budget as DAPO's generate + mc stages, spread over the training problems
            budget, n_prob = generation_budget(d("generate"), d("mc"), c.run.budget)
            k_rft = max(1, round(budget / max(n_prob, 1)))
            cfg = self._fill(c.generate, problems=self.train_set, model_path=ref, seed=seed + 17, num_samples=k_rft,
                             keep=k_rft)
            return "generate", cfg, [str(d(unit))], {"problems": file_sha256(self.train_set),
                                                     "model": self._model_id(ref), "budget": budget}
        if unit == "rft":
            cfg = self._fill(c.rft, init_path=ref, seed=seed)
            return "rft", cfg, [str(d("rft-generate")), str(d(unit))], {"rft-generate": self._shard_id(d("rft-generate")),
                                                                         "init": self._model_id(ref)}
        raise PipelineError(f"unknown stage {unit!r}")

    def actor_config(self, unit: str, ref: str, seed: int):
        """The actor stage config of ``unit`` (``actor`` | ``actor-outcome``): the outcome-only control may
        have its own beta (``run.outcome_beta``; its advantages have another scale than the critic's)."""
        cfg = self._fill(self.cfg.actor, init_path=ref, seed=seed)
        if unit == "actor-outcome" and self.cfg.run.outcome_beta is not None:
            cfg = dataclasses.replace(cfg, beta=self.cfg.run.outcome_beta)
        return cfg

    def eval_config(self):
        g = self.cfg.generate
        return self._fill(self.cfg.eval, verifier=g.verifier, verify_timeout_s=g.verify_timeout_s,
                          prompt_template=g.prompt_template, system_prompt=g.system_prompt)

    def _require_type(self, section: str) -> None:
        if section_types()[section] is None:
            raise PipelineError(f"stage {section!r} is not available in this version "
                                f"(dapo_mcore.actor.{'advantage' if section == 'advantage' else 'train'} missing)")

    def _model_id(self, path: str | Path) -> dict:
        try:
            return model_identity(path)
        except PipelineError as e:
            raise PipelineError(f"input checkpoint: {e}") from None

    def _shard_id(self, path: Path) -> dict:
        self._check_done_input(path)
        return input_identity(path)

    def _output_id(self, path: Path) -> dict:
        self._check_done_input(path)
        return {"digest": json.loads((path / STAMP).read_text())["digest"],
                **(input_identity(path) if (path / "manifest.json").is_file() else {})}

    def _check_done_input(self, path: Path) -> None:
        st = _read_stamp(path)
        if not st or not st.get("finished"):
            raise PipelineError(f"{path}: input stage {path.name!r} has not finished; run it first "
                                f"(`dapo-mcore run CONFIG` runs every stage)")

    # -- status / run ---------------------------------------------------------------------------
    def check_outputs(self, unit: str, path: Path) -> None:
        """Raise PipelineError unless the stage's outputs are complete and intact."""
        if unit in ("generate", "mc", "rft-generate") or (unit.startswith("advantage") and (path / "manifest.json").is_file()):
            verify_sharded(path)
        if unit.startswith(("critic", "actor", "advantage")) or unit == "rft":
            try:
                json.loads((path / "summary.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise PipelineError(f"{path / 'summary.json'}: missing or unreadable ({e})") from None
        if unit.startswith(("critic", "actor")) or unit == "rft":
            verify_hf_checkpoint(path / "hf")
        if unit == "eval-model":
            from dapo_mcore.eval.evaluate import load_results

            try:
                load_results(path)
            except (OSError, ValueError, KeyError) as e:
                raise PipelineError(f"{path}: evaluation results missing or corrupt ({e})") from None

    def status(self, unit: str, path: Path, dig: str) -> str:
        """``"done"``, ``"resume"`` (same inputs, unfinished or damaged), ``"stale"`` or ``"new"``."""
        st = _read_stamp(path)
        if st is None:
            return "new"
        if st.get("digest") != dig:
            return "stale"
        if not st.get("finished"):
            return "resume"
        try:
            self.check_outputs(unit, path)
        except PipelineError as e:
            self.log(f"  {path}: {e}; recomputing")
            return "resume"
        return "done"

    def _begin(self, path: Path, unit: str, dig: str, cfg: Any, ident: dict, force: bool) -> Optional[StageResult]:
        state = "stale" if force and path.exists() else self.status(unit, path, dig)
        if state == "done":
            return StageResult(-1, unit, "skipped", json.loads((path / STAMP).read_text()).get("seconds", 0.0))
        if state == "stale":
            self.log(f"  {path}: config or inputs changed; recomputing from scratch")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / STAMP, {"stage": unit, "digest": dig, "finished": False, "config": to_dict(cfg),
                                         "inputs": ident})
        return None

    def _finish(self, path: Path, seconds: float) -> None:
        st = json.loads((path / STAMP).read_text())
        st.update(finished=True, seconds=seconds, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(path / STAMP, st)

    def run_unit(self, k: int, unit: str, force: bool = False) -> StageResult:
        if not self._prepared:
            self.prepare(echo=False)
        if unit == "eval":
            return self.run_eval(k, force=force)
        path = self.stage_dir(k, unit)
        kind, cfg, args, ident = self.stage_plan(k, unit)
        dig = digest({"stage": unit, "config": _stage_identity(cfg), "inputs": ident})
        skipped = self._begin(path, unit, dig, cfg, ident, force)
        if skipped:
            self.log(f"[iter {k}] {unit}: finished earlier, outputs verified; skipped")
            return self._record(dataclasses.replace(skipped, iteration=k))
        self.log(f"[iter {k}] {unit}: running -> {path}")
        t0 = time.perf_counter()
        try:
            res = self._launch(kind, cfg, args, path)
        except ValueError as e:   # the stages raise ValueError for bad settings / unusable data
            raise PipelineError(f"stage {unit} (iteration {k}) failed: {e}") from None
        if isinstance(res, dict) and res.get("partial"):
            raise PipelineError(f"{path}: stage {unit} stopped after max_steps ({res.get('steps')}/"
                                f"{res.get('total_steps')} steps); re-run to continue")
        self.check_outputs(unit, path)
        sec = time.perf_counter() - t0
        self._finish(path, sec)
        return self._record(StageResult(k, unit, "ran", sec))

    def _launch(self, kind: str, cfg: Any, args: list[str], path: Path) -> Any:
        if kind not in DISTRIBUTED:
            return execute(kind, cfg, args)
        n = self.nproc(cfg)
        if n == 1:
            return execute(kind, cfg, args)
        job = path.with_name(path.name + ".job.json")
        write_job(job, kind, cfg, args)
        cmd = torchrun_command(n, job)
        self.log(f"  launching {n} processes: {' '.join(cmd)}")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise PipelineError(f"stage {path.name} failed under torchrun (exit {rc}); job file {job}")
        return None

    def eval_models(self, k: int) -> dict[str, str]:
        """Label -> checkpoint compared in iteration ``k``'s eval (reference first)."""
        models = {"reference": self.policy(k)}
        for unit, label in (("actor", "dapo"), ("actor-outcome", "outcome-only"), ("rft", "rft")):
            st = _read_stamp(self.stage_dir(k, unit))
            if unit in self.units(k) and st and st.get("finished"):
                models[label] = str(self.stage_dir(k, unit) / "hf")
        return models

    def run_eval(self, k: int, force: bool = False, models: Optional[dict[str, str]] = None,
                 out: Optional[Path] = None) -> StageResult:
        """Evaluate every model of the iteration (each cached in ``eval/<label>/``) and compare."""
        from dapo_mcore.eval.evaluate import evaluate_checkpoint, load_results
        from dapo_mcore.eval.table import comparison_markdown, write_comparison

        ecfg = self.eval_config()
        models = models or self.eval_models(k)
        out = out or self.stage_dir(k, "eval")
        if ecfg.backend.kind == "sglang" and len(models) > 1:
            raise PipelineError("eval.backend.kind=sglang serves one model per server; the pipeline compares "
                                f"{len(models)} checkpoints: use the embedded backend or `dapo-mcore eval --model`")
        sets_id = {n: file_sha256(p) for n, p in self.eval_sets.items()}
        results, total, ran = {}, 0.0, False
        for label, path in models.items():
            sub = out / label
            ident = {"model": self._model_id(path), "sets": sets_id}
            dig = digest({"stage": "eval", "config": _stage_identity(ecfg), "inputs": ident})
            skipped = self._begin(sub, "eval-model", dig, ecfg, ident, force)
            if skipped:
                self.log(f"[iter {k}] eval {label}: finished earlier; skipped")
                total += skipped.seconds
            else:
                self.log(f"[iter {k}] eval {label}: {path}")
                t0 = time.perf_counter()
                evaluate_checkpoint(ecfg, path, self.eval_sets, sub)
                self.check_outputs("eval-model", sub)
                sec = time.perf_counter() - t0
                self._finish(sub, sec)
                total, ran = total + sec, True
            results[label] = load_results(sub)
        write_comparison(results, out)
        self.log(comparison_markdown(json.loads((out / "comparison.json").read_text())))
        return self._record(StageResult(k, "eval", "ran" if ran else "skipped", total))

    def _record(self, r: StageResult) -> StageResult:
        self.results.append(r)
        path = self.out / "timings.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old[f"iter_{r.iteration}/{r.stage}"] = dataclasses.asdict(r)
        atomic_write_json(path, old)
        return r

    def run(self, iterations: Optional[int] = None, report: bool = True) -> list[StageResult]:
        """Run every stage of every iteration (skipping finished ones), then write the report."""
        if not self._prepared:
            self.prepare()
        n_iter = iterations or self.cfg.run.iterations
        try:
            for k in range(n_iter):
                for unit in self.units(k):
                    if unit in ("advantage", "actor", "advantage-outcome", "actor-outcome") and \
                            section_types()[unit.split("-")[0]] is None:
                        note = f"stage module for {unit!r} is not installed in this version"
                        self.log(f"[iter {k}] {unit}: not run ({note})")
                        self._record(StageResult(k, unit, "not run", 0.0, note))
                        continue
                    self.run_unit(k, unit)
                if k + 1 < n_iter and not (_read_stamp(self.stage_dir(k, "actor")) or {}).get("finished"):
                    raise PipelineError(f"iteration {k + 1} needs iteration {k}'s actor, which was not trained")
        finally:
            _teardown()
        if report:
            from dapo_mcore.report import write_report

            path = write_report(self.out)
            self.log(f"report: {path}")
        return self.results


def generation_budget(gen_dir: Path, mc_dir: Path, mode: str = "samples") -> tuple[float, int]:
    """``(budget in full-solution samples, problems)`` of DAPO's generate + mc stages, for RFT to spend.

    ``"samples"``: every sample counts one (a one-step candidate too). ``"tokens"``: the generated tokens
    (completions and one-step candidates) divided by the mean length of a generate-stage sample, i.e. as
    many whole solutions as the same number of generated tokens buys."""
    gen = json.loads((gen_dir / "summary.json").read_text())
    mc = json.loads((mc_dir / "summary.json").read_text())
    metered = [gen["throughput"], mc["throughput"]] + ([mc["one_step"]] if mc.get("one_step") else [])
    if mode == "samples":
        return float(sum(m["samples"] for m in metered)), int(gen["problems"])
    if mode != "tokens":
        raise PipelineError(f"run.budget must be 'samples' or 'tokens', got {mode!r}")
    per_sample = gen["throughput"]["completion_tokens"] / max(1, gen["throughput"]["samples"])
    return sum(m["completion_tokens"] for m in metered) / max(per_sample, 1e-9), int(gen["problems"])


def _read_stamp(path: Path) -> Optional[dict]:
    try:
        return json.loads((Path(path) / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _teardown() -> None:
    """Destroy the in-process group left by an in-process distributed stage (if any)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        from dapo_mcore.parallel.runtime import destroy_parallel

        destroy_parallel()


__all__ = ["Pipeline", "PipelineError", "StageResult", "verify_hf_checkpoint", "verify_sharded", "model_identity",
           "run_job", "write_job", "torchrun_command", "STAMP"]
