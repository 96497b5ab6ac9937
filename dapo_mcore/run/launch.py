"""Launching a unit: in this process, or as a torchrun job of ``python -m dapo_mcore.cli _worker JOB`` when a
distributed stage needs more than one process.

A job file holds the unit's name, its filled config and its positional arguments; every torchrun rank
rebuilds the config from the stage table's dataclass and calls the unit's function. Inside a torchrun job
started by a launcher (``scripts/launch_torchrun.sh -- dapo-mcore train-critic CONFIG``) every rank already
runs the CLI: a distributed stage then runs in place on every rank, and only rank 0 writes the run's files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from dapo_mcore.config import build, to_dict
from dapo_mcore.data.shards import atomic_write_json
from dapo_mcore.run.layout import PipelineError
from dapo_mcore.run.stages import STAGE, Stage


def inside_torchrun() -> bool:
    """True on a rank of a torchrun job (the variables torchrun sets for ``env://`` rendezvous)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_writer() -> bool:
    """Whether this process writes the run's files (rank 0 of a torchrun job, or a plain process)."""
    return int(os.environ.get("RANK", "0")) == 0


def execute(stage: Stage, cfg: Any, args: list[str]) -> Any:
    """Run one unit's function in this process."""
    return stage.run(cfg, *args)


def write_job(path: Path, stage: Stage, cfg: Any, args: list[str]) -> None:
    atomic_write_json(path, {"stage": stage.name, "config": to_dict(cfg), "args": [str(a) for a in args]})


def run_job(path: str | Path) -> Any:
    """Load a job file written by :func:`write_job` and execute it (on every torchrun rank)."""
    job = json.loads(Path(path).read_text())
    stage = STAGE[job["stage"]]
    return execute(stage, build(stage.config, job["config"]), job["args"])


def torchrun_command(nproc: int, job: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dapo_mcore.cli", "_worker", str(job)]


def launch(stage: Stage, cfg: Any, args: list[str], job: Path, nproc: int, log: Callable[[str], None]) -> Any:
    """Run a unit where it belongs; returns its summary (None from a torchrun job: read its summary.json)."""
    if inside_torchrun():
        if not stage.distributed:
            raise PipelineError(f"stage {stage.name} runs in one process: run it outside torchrun")
        return execute(stage, cfg, args)
    if not stage.distributed or nproc == 1:
        return execute(stage, cfg, args)
    write_job(job, stage, cfg, args)
    cmd = torchrun_command(nproc, job)
    log(f"  launching {nproc} processes: {' '.join(cmd)}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise PipelineError(f"stage {stage.name} failed under torchrun (exit {rc}); job file {job}")
    return None
