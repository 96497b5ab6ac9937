"""``dapo-mcore``: the DAPO pipeline from the command line.

    dapo-mcore run CONFIG [key=value ...] [--iterations K] [--nproc N]
    dapo-mcore generate|mc|train-critic|advantage|train-actor CONFIG [key=value ...] [--iteration K] [--force]
    dapo-mcore eval CONFIG [key=value ...] [--iteration K] [--model LABEL=PATH ...]
    dapo-mcore export CONFIG [--iteration K] [--stage actor|critic] --to DIR
    dapo-mcore report CONFIG
    dapo-mcore plan ...            (forwarded to dapo_mcore.plan)

User errors (bad config, missing file, unfinished input stage) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

STAGE_COMMANDS = {"generate": "generate", "mc": "mc", "train-critic": "critic", "advantage": "advantage",
                  "train-actor": "actor"}
STAGE_HELP = {
    "generate": "stage 1: sample K solutions per training problem, verify, keep M balanced",
    "mc": "stage 2: N completions per step-prefix state -> MC values and candidate actions",
    "train-critic": "stage 3: train the critic V(s) on the MC values (megatron; torchrun when nproc > 1)",
    "advantage": "stage 4: critic-scored advantages A_i = Q_i - mean Q, gap filter, reference log-probs",
    "train-actor": "stage 5: train the actor with the DAPO loss (megatron; torchrun when nproc > 1)",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides parsed as YAML scalars, e.g. critic.lr=1e-4 run.nproc=2")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dapo-mcore", description=(
        "Direct Advantage Policy Optimization (arXiv 2412.18279) on megatron-core: generate -> mc -> critic -> "
        "advantage -> actor -> eval, with finished stages skipped on re-run and interrupted ones resumed."))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run every stage of every iteration, then write report.md",
                       description="Run all stages (skipping finished ones) and write <out>/report.md.")
    _config_args(p)
    p.add_argument("--iterations", type=int, help="iterative DAPO: K iterations (overrides run.iterations)")
    p.add_argument("--nproc", type=int, help="processes for the distributed stages (overrides run.nproc)")

    for name, help_ in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_, description=help_ + ". Its input stages must have finished.")
        _config_args(p)
        p.add_argument("--iteration", type=int, default=0, help="iteration index (default 0)")
        p.add_argument("--nproc", type=int, help="processes for distributed stages (overrides run.nproc)")
        p.add_argument("--force", action="store_true", help="recompute even if finished")

    p = sub.add_parser("eval", help="greedy accuracy of checkpoints on the held-out sets, side by side",
                       description="Evaluate the iteration's reference and actor(s) on data.eval (greedy), or the "
                                   "checkpoints given with --model, and print the comparison table.")
    _config_args(p)
    p.add_argument("--iteration", type=int, default=0)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                   help="compare these HF checkpoints instead (first = baseline); repeatable")
    p.add_argument("--force", action="store_true", help="re-evaluate even if cached")

    p = sub.add_parser("export", help="verify and copy a trained checkpoint (HF format) out of the run",
                       description="Check an iteration's exported HF checkpoint (index and every shard) and copy it.")
    _config_args(p)
    p.add_argument("--iteration", type=int, help="default: the last iteration (run.iterations - 1)")
    p.add_argument("--stage", choices=["actor", "actor-outcome", "critic"], default="actor")
    p.add_argument("--to", required=True, help="destination directory (must not exist)")

    p = sub.add_parser("report", help="(re)write <out>/report.md from the run directory",
                       description="Rebuild the Markdown run report from the files of a run.")
    _config_args(p)

    sub.add_parser("plan", help="memory planner (arguments forwarded to dapo_mcore.plan)", add_help=False,
                   description="Forwarded to dapo_mcore.plan.main.")
    return ap


def _load(a, extra: Optional[list[str]] = None):
    from dapo_mcore.config import load_run_config

    ov = list(a.overrides) + list(extra or [])
    if getattr(a, "iterations", None) is not None:
        ov.append(f"run.iterations={a.iterations}")
    if getattr(a, "nproc", None) is not None:
        ov.append(f"run.nproc={a.nproc}")
    return load_run_config(a.config, ov)


def _cmd_plan(argv: list[str]) -> int:
    try:
        from dapo_mcore.plan import main as plan_main
    except ImportError as e:
        raise _UserError(f"the memory planner is not available in this version (dapo_mcore.plan: {e})") from None
    plan_main(argv)
    return 0


class _UserError(Exception):
    pass


def _dispatch(a) -> int:
    from dapo_mcore.pipeline import Pipeline, PipelineError, verify_hf_checkpoint

    if a.command == "run":
        Pipeline(_load(a)).run()
        return 0
    if a.command in STAGE_COMMANDS:
        pipe = Pipeline(_load(a))
        pipe.prepare()
        if a.iteration < 0 or a.iteration >= pipe.cfg.run.iterations:
            raise PipelineError(f"--iteration {a.iteration}: the config has run.iterations={pipe.cfg.run.iterations}")
        try:
            pipe.run_unit(a.iteration, STAGE_COMMANDS[a.command], force=a.force)
        finally:
            from dapo_mcore.pipeline import _teardown

            _teardown()
        return 0
    if a.command == "eval":
        pipe = Pipeline(_load(a))
        pipe.prepare(echo=False)
        if a.model:
            models = {}
            for m in a.model:
                label, eq, path = m.partition("=")
                if not eq or not label or not path:
                    raise _UserError(f"--model {m!r}: expected LABEL=PATH")
                models[label] = path
            pipe.run_eval(a.iteration, force=a.force, models=models, out=pipe.out / "eval_custom")
        else:
            pipe.run_eval(a.iteration, force=a.force)
        return 0
    if a.command == "export":
        cfg = _load(a)
        from dapo_mcore.pipeline import STAMP

        k = cfg.run.iterations - 1 if a.iteration is None else a.iteration
        src = Path(cfg.run.out_dir) / f"iter_{k}" / a.stage
        st = src / STAMP
        if not st.is_file() or '"finished": true' not in st.read_text():
            raise PipelineError(f"{src}: stage {a.stage} of iteration {k} has not finished; nothing to export")
        verify_hf_checkpoint(src / "hf")
        dst = Path(a.to)
        if dst.exists():
            raise _UserError(f"--to {dst}: already exists")
        shutil.copytree(src / "hf", dst)
        verify_hf_checkpoint(dst)
        print(f"exported {src / 'hf'} -> {dst}")
        return 0
    if a.command == "report":
        from dapo_mcore.report import write_report

        cfg = _load(a)
        print(write_report(cfg.run.out_dir))
        return 0
    raise _UserError(f"unknown command {a.command!r}")


def _user_errors() -> tuple:
    from dapo_mcore.config import ConfigError
    from dapo_mcore.data.problems import ProblemSetError
    from dapo_mcore.data.shards import ShardError
    from dapo_mcore.parallel.runtime import ParallelConfigError
    from dapo_mcore.pipeline import PipelineError

    return (_UserError, ConfigError, ProblemSetError, ShardError, ParallelConfigError, PipelineError,
            FileNotFoundError)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":          # torchrun entry: python -m dapo_mcore.cli _worker JOB
        from dapo_mcore.pipeline import run_job

        if len(argv) != 2:
            print("usage: dapo-mcore _worker JOB.json", file=sys.stderr)
            return 2
        from dapo_mcore.parallel.runtime import process_group_scope

        with process_group_scope():
            run_job(argv[1])
        return 0
    if argv and argv[0] == "plan":
        try:
            return _cmd_plan(argv[1:])
        except _UserError as e:
            print(f"dapo-mcore: error: {e}", file=sys.stderr)
            return 2
    a = build_parser().parse_args(argv)
    try:
        return _dispatch(a)
    except _user_errors() as e:
        print(f"dapo-mcore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dapo-mcore: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
