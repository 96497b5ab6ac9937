"""Launching a unit: in this process, or as a torchrun job of ``python -m dapo_mcore.cli _worker JOB`` when a
distributed stage needs more than one process, on this node or across the nodes of an allocation.

A job file holds the unit's name, its filled config and its positional arguments; every torchrun rank
rebuilds the config from the stage table's dataclass and calls the unit's function. A rank that raises
writes its exception (type, message, where in our code, traceback, time) to ``<unit>.logs/rank-<R>.json``;
when the job fails the launcher raises :class:`StageFailed` with the first failing rank's exception.

**Several nodes** (:class:`Cluster`, ``dapo-mcore run CONFIG --nnodes N --node-rank R --master-addr HEAD``
on every node): node 0, the head, runs the stage graph; the one-process units run on the head only, and
for every distributed unit the head announces the job in ``<out>/.nodes/head.json`` and starts
``torchrun --nnodes N --node-rank 0 --master-addr HEAD --master-port P``. The other nodes' launchers
(:func:`follow`) join each announced job as ``--node-rank R`` and exit when the head's run ends. The head
rewrites the file every second (a heartbeat): a follower acts only for a live head, and stops when the head
has gone silent. The run directory is shared by the nodes.

Inside a torchrun job started by a launcher (``scripts/launch_torchrun.sh -- dapo-mcore train-critic CONFIG``)
every rank already runs the CLI: a distributed stage then runs in place on every rank, and only rank 0 writes
the run's files.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dapo_mcore.config import build, to_dict
from dapo_mcore.data.shards import atomic_write_json
from dapo_mcore.run.layout import PipelineError
from dapo_mcore.run.stages import STAGE, Stage

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class LayoutError(PipelineError):
    """The processes a distributed stage gets do not fit its model-parallel layout."""


class StageFailed(PipelineError):
    """A torchrun job of a stage failed; the message carries the first failing rank's exception."""


def inside_torchrun() -> bool:
    """True on a rank of a torchrun job (the variables torchrun sets for ``env://`` rendezvous)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_writer() -> bool:
    """Whether this process writes the run's files (rank 0 of a torchrun job, or a plain process)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Cluster:
    """This node's place in the allocation (one node by default)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self):
        if self.nnodes < 1:
            raise PipelineError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise PipelineError(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if not 0 < self.master_port < 65536:
            raise PipelineError(f"--master-port must be in 1..65535, got {self.master_port}")

    @property
    def head(self) -> bool:
        return self.node_rank == 0


def processes(parallel: Any, nproc: int, cluster: Cluster) -> tuple[int, int]:
    """``(processes per node, world size)`` of a distributed stage with layout ``parallel`` (its
    ``ParallelConfig``) under ``run.nproc`` = ``nproc``: on one node ``max(nproc, TP x PP x CP)``, on several
    ``nproc`` per node; the world must be a multiple of TP x PP x CP (else :class:`LayoutError`)."""
    mp = 1
    if parallel is not None:
        mp = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
              * parallel.context_parallel_size)
    per_node = max(nproc, mp) if cluster.nnodes == 1 else nproc
    world = per_node * cluster.nnodes
    if world % mp:
        where = f"run.nproc={nproc}" if cluster.nnodes == 1 else f"{cluster.nnodes} nodes x run.nproc={nproc} = {world}"
        raise LayoutError(f"{where} is not a multiple of the model-parallel size TP x PP x CP = {mp}")
    return per_node, world


# -- the worker side ---------------------------------------------------------------------------------------
def logs_dir(job: Path) -> Path:
    """The log directory of a job ``<unit>.job.json``: ``<unit>.logs`` beside it."""
    return job.with_name(job.name.removesuffix(".job.json") + ".logs")


def _our_frame(tb) -> str:
    """``file:line in function`` of the innermost frame in this package (else the innermost frame)."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(PACKAGE_ROOT)]
    f = (ours or frames)[-1] if frames else None
    if f is None:
        return "?"
    try:
        name = Path(f.filename).resolve().relative_to(PACKAGE_ROOT.parent)
    except ValueError:
        name = f.filename
    return f"{name}:{f.lineno} in {f.name}"


def write_error(log_dir: Path, exc: BaseException) -> Path:
    """Record ``exc`` of this rank as ``log_dir/rank-<RANK>.json``."""
    rank = int(os.environ.get("RANK", "0"))
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank-{rank}.json"
    atomic_write_json(path, {
        "rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "node": socket.gethostname(),
        "type": type(exc).__name__, "message": str(exc), "where": _our_frame(exc.__traceback__),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "time": time.time()})
    return path


@contextmanager
def recording_errors(log_dir: Path) -> Iterator[None]:
    """Around a torchrun rank's work: an exception is written to ``log_dir`` (:func:`write_error`), then
    re-raised."""
    try:
        yield
    except BaseException as e:      # noqa: BLE001 - recorded, then re-raised
        write_error(log_dir, e)
        raise


def first_error(log_dir: Path) -> Optional[dict]:
    """The earliest exception a rank of the job recorded in ``log_dir``, or None."""
    errs = []
    for p in sorted(log_dir.glob("rank-*.json")):
        try:
            errs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return min(errs, key=lambda e: (e.get("time", 0.0), e.get("rank", 0))) if errs else None


def _torchrun_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _die_with_parent() -> None:
    """In the torchrun child: be sent SIGTERM when the launcher dies (Linux), so that a killed launcher does
    not leave its job running (torchrun then stops its workers)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))     # PR_SET_PDEATHSIG


def _torchrun(cmd: list[str]) -> int:
    return subprocess.run(cmd, env=_torchrun_env(), preexec_fn=_die_with_parent).returncode


def run_torchrun(cmd: list[str], log_dir: Path, what: str, log: Callable[[str], None] = print) -> None:
    """Run a torchrun command whose ranks record their exceptions in ``log_dir``; raise :class:`StageFailed`
    naming ``what``, the first failing rank and its exception if it fails."""
    log(f"  launching: {' '.join(cmd)}")
    rc = _torchrun(cmd)
    if rc == 0:
        return
    err = first_error(log_dir)
    if err is None:
        raise StageFailed(f"{what} failed under torchrun (exit {rc}) and no rank recorded an exception (killed, "
                          f"out of memory, or a node lost?); logs in {log_dir}")
    tb = log_dir / f"rank-{err['rank']}.json"
    raise StageFailed(f"{what} failed on rank {err['rank']} (node {err['node']}): {err['type']}: {err['message']}\n"
                      f"  at {err['where']}  (traceback: {tb})")


def execute(stage: Stage, cfg: Any, args: list[str]) -> Any:
    """Run one unit's function in this process."""
    return stage.run(cfg, *args)


def write_job(path: Path, stage: Stage, cfg: Any, args: list[str]) -> None:
    atomic_write_json(path, {"stage": stage.name, "config": to_dict(cfg), "args": [str(a) for a in args]})


def run_job(path: str | Path) -> Any:
    """Load a job file written by :func:`write_job` and execute it (on every torchrun rank); an exception is
    recorded in the job's log directory."""
    path = Path(path)
    with recording_errors(logs_dir(path)):
        job = json.loads(path.read_text())
        stage = STAGE[job["stage"]]
        return execute(stage, build(stage.config, job["config"]), job["args"])


def torchrun_command(nproc: int, job: Path, cluster: Optional[Cluster] = None, port: Optional[int] = None,
                     python: str = sys.executable) -> list[str]:
    """The torchrun command of a job: ``--standalone`` on one node; across ``cluster``'s nodes a static
    rendezvous at its master (``port`` overrides its port), this node as ``--node-rank``."""
    cluster = cluster or Cluster()
    if cluster.nnodes == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(cluster.nnodes), "--node-rank", str(cluster.node_rank), "--master-addr",
                 cluster.master_addr, "--master-port", str(port or cluster.master_port)]
    return [python, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}", "--max-restarts=0",
            "-m", "dapo_mcore.cli", "_worker", str(job)]


# -- several nodes -----------------------------------------------------------------------------------------
HEARTBEAT_S = 1.0
STALE_S = 30.0         # a follower stops when the head has not written for this long


def head_file(out: Path) -> Path:
    return Path(out) / ".nodes" / "head.json"


class Head:
    """The head's side of a multi-node run (a context manager around the run): the heartbeat, the
    announcement of each torchrun job, and the outcome (``done`` or ``failed`` with the error)."""

    def __init__(self, cluster: Cluster, out: str | Path):
        if not cluster.head:
            raise PipelineError("only node 0 runs the stage graph")
        self.cluster, self.path = cluster, head_file(Path(out))
        self.state = {"session": uuid.uuid4().hex, "beat": 0, "nnodes": cluster.nnodes, "state": "running",
                      "launch": None, "seq": 0, "error": None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="dapo-head-heartbeat")

    def _write(self) -> None:
        with self._lock:
            self.state["beat"] += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.state)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()

    def __enter__(self) -> "Head":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, typ, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self.state.update(launch=None, state="failed" if exc else "done",
                              error=f"{type(exc).__name__}: {exc}" if exc else None)
        self._write()

    def run(self, job: Path, nproc: int, what: str, log: Callable[[str], None]) -> None:
        """Announce ``job`` to the followers and run this node's part of it."""
        log_dir = logs_dir(job)
        shutil.rmtree(log_dir, ignore_errors=True)      # the errors of an earlier attempt
        with self._lock:
            self.state["seq"] += 1
            self.state["launch"] = {"seq": self.state["seq"], "job": str(job), "nproc": nproc,
                                    "port": self.cluster.master_port}
        self._write()
        try:
            run_torchrun(torchrun_command(nproc, job, self.cluster), log_dir, what, log)
        finally:
            with self._lock:
                self.state["launch"] = None
            self._write()


def follow(cluster: Cluster, out: str | Path, log: Callable[[str], None] = print,
           wait_s: float = 3600.0) -> int:
    """A follower node's launcher: join every torchrun job the head announces until its run ends; returns
    0 when the head's run finished, 1 when it failed or the head went silent. Waits up to ``wait_s`` for a
    live head to appear."""
    if cluster.head:
        raise PipelineError("node 0 is the head: it runs the stage graph")
    path = head_file(Path(out))
    last, changed, live_session, done = None, time.monotonic(), None, set()
    start = time.monotonic()
    log(f"[node {cluster.node_rank}] following the head's run in {out}")
    while True:
        try:
            st = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            st = None
        now = time.monotonic()
        key = None if st is None else (st.get("session"), st.get("beat"))
        if key != last:
            if last is not None and key is not None:
                live_session = st["session"]          # seen writing while we watch: a live head
            last, changed = key, now
        live = st is not None and st.get("session") == live_session and now - changed < STALE_S
        if live:
            if st["state"] == "done":
                log(f"[node {cluster.node_rank}] the head's run finished")
                return 0
            if st["state"] == "failed":
                log(f"[node {cluster.node_rank}] the head's run failed: {st.get('error')}")
                return 1
            job = st.get("launch")
            if job and (st["session"], job["seq"]) not in done:
                done.add((st["session"], job["seq"]))
                cmd = torchrun_command(job["nproc"], Path(job["job"]), cluster, job["port"])
                log(f"[node {cluster.node_rank}] joining {Path(job['job']).name}: {' '.join(cmd)}")
                rc = _torchrun(cmd)
                if rc:
                    log(f"[node {cluster.node_rank}] torchrun exited {rc}; the head reports the cause")
                continue
        elif live_session is not None and now - changed >= STALE_S:
            log(f"[node {cluster.node_rank}] the head has not written {path} for {STALE_S:.0f} s; stopping "
                "(re-run the job to resume)")
            return 1
        elif live_session is None and now - start > wait_s:
            log(f"[node {cluster.node_rank}] no live head in {out} after {wait_s:.0f} s")
            return 1
        time.sleep(0.2)


def launch(stage: Stage, cfg: Any, args: list[str], job: Path, nproc: int, log: Callable[[str], None],
           head: Optional[Head] = None) -> Any:
    """Run a unit where it belongs; returns its summary (None from a torchrun job: read its summary.json).
    ``nproc``: ``run.nproc``; ``head``: the multi-node session, when this is the head of several nodes."""
    if inside_torchrun():
        if not stage.distributed:
            raise PipelineError(f"stage {stage.name} runs in one process: run it outside torchrun")
        return execute(stage, cfg, args)
    cluster = head.cluster if head else Cluster()
    if not stage.distributed:
        return execute(stage, cfg, args)
    per_node, world = processes(getattr(cfg, "parallel", None), nproc, cluster)
    if world == 1:
        return execute(stage, cfg, args)
    write_job(job, stage, cfg, args)
    what = f"stage {stage.name}"
    if head is not None:
        log(f"  {world} processes on {cluster.nnodes} nodes ({per_node} per node)")
        head.run(job, per_node, what, log)
    else:
        shutil.rmtree(logs_dir(job), ignore_errors=True)
        run_torchrun(torchrun_command(per_node, job), logs_dir(job), what, log)
    return None
