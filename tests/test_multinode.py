"""A cluster run through the stage graph, with two "nodes" on one machine: two launcher processes
(``dapo-mcore run CONFIG --nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1``, gloo, one process per node).
Node 0 runs the stage graph; every Megatron stage (critic, advantage, actor) runs as one torchrun job across
both nodes (DP=2). A two-iteration run whose head is SIGKILLed (with its torchrun agent and rank, as when a node dies)
in the middle of iteration 0's critic training, then resumed, equals the uninterrupted run: the same stage
digests, bit-identical critic (the interrupted unit) and final actor tensors, the same eval figures.

Slow tier (``scripts/test.sh --slow``): 4 to 30 minutes on 2 cores (1783 s measured on a busy machine, ~900 s
on a less loaded one, 222 s on an idle 2-core Intel Xeon on 2026-12-07: two whole two-iteration runs plus the
resume, 12 torchrun jobs)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "configs" / "smoke.yaml"
UNITS = ("generate", "mc", "critic", "advantage", "actor", "eval")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(out: Path, rank: int, port: int, log: Path) -> subprocess.Popen:
    """One node's launcher, in its own session (killing its group is a node going away)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "dapo_mcore.cli", "run", str(SMOKE), f"run.out_dir={out}", "run.iterations=2",
           "run.controls=[]", "run.nproc=1", "critic.save_interval=3",
           "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_node(p: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and every process under it (torchrun starts its workers in sessions of
    their own, so the launcher's process group alone would leave the rank running)."""
    tree = [p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    psutil.wait_procs([psutil.Process(x) for x in tree[1:] if psutil.pid_exists(x)], timeout=30)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 1500) -> None:
    for p, log in zip(procs, logs):
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"{log}: exit {rc}\n{log.read_text()[-4000:]}"


def _run(out: Path, tmp: Path, tag: str) -> None:
    port = _free_port()
    logs = [tmp / f"{tag}-node{r}.log" for r in (0, 1)]
    _wait([_node(out, r, port, logs[r]) for r in (0, 1)], logs)


def _outputs(out: Path) -> dict:
    digests = {f"{k}/{u}": json.loads((out / f"iter_{k}" / u / "stage.json").read_text())["digest"]
               for k in (0, 1) for u in UNITS if u != "eval"}
    evals = {k: json.loads((out / f"iter_{k}" / "eval" / "comparison.json").read_text())["accuracy"] for k in (0, 1)}
    return {"digests": digests, "evals": evals, "critic": _tensors(out / "iter_0" / "critic" / "hf"),
            "actor": _tensors(out / "iter_1" / "actor" / "hf")}


def _tensors(hf: Path) -> dict:
    out = {}
    for shard in sorted(hf.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(3000)
def test_two_nodes_two_iterations_killed_and_resumed_equals_uninterrupted(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    t0 = time.perf_counter()
    _run(ref, tmp_path, "ref")
    timings = json.loads((ref / "timings.json").read_text())
    assert {f"iter_{k}/{u}" for k in (0, 1) for u in UNITS} <= set(timings)
    for u in ("critic", "advantage", "actor"):                 # launched across both nodes
        assert (ref / "iter_0" / f"{u}.job.json").is_file()
    head_log = (tmp_path / "ref-node0.log").read_text()
    assert "2 processes on 2 nodes (1 per node)" in head_log
    assert "--nnodes 2 --node-rank 1" in (tmp_path / "ref-node1.log").read_text()
    t_ref = time.perf_counter() - t0

    # the interrupted run: SIGKILL node 0 (the head and its torchrun) once the critic saved a checkpoint
    port = _free_port()
    logs = [tmp_path / f"run-node{r}.log" for r in (0, 1)]
    procs = [_node(run, r, port, logs[r]) for r in (0, 1)]
    latest = run / "iter_0" / "critic" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 1200
    while not latest.is_file():
        assert procs[0].poll() is None, logs[0].read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill_node(procs[0])
    stamp = json.loads((run / "iter_0" / "critic" / "stage.json").read_text())
    assert not stamp["finished"], "the critic finished before the kill: nothing was interrupted"
    saved = json.loads(latest.read_text())["step"]
    total = json.loads((ref / "iter_0" / "critic" / "summary.json").read_text())["steps"]
    assert 0 < saved < total
    assert procs[1].wait(timeout=120) == 1                      # the follower sees its head go silent
    assert "the head has not written" in logs[1].read_text()

    _run(run, tmp_path, "resume")
    resume_log = (tmp_path / "resume-node0.log").read_text()
    assert "[iter 0] generate: finished earlier, outputs verified; skipped" in resume_log
    assert "[iter 0] critic: running" in resume_log and "recomputing from scratch" not in resume_log
    assert (latest.parent / f"iter_{saved:07d}").is_dir()       # resumed from the step saved before the kill

    a, b = _outputs(ref), _outputs(run)
    assert a["digests"] == b["digests"]
    assert a["evals"] == b["evals"]
    assert a["actor"].keys() == b["actor"].keys()
    for unit in ("critic", "actor"):                            # the interrupted unit, and the final policy
        assert a[unit].keys() == b[unit].keys()
        for name, t in a[unit].items():
            assert t.equal(b[unit][name]), (unit, name)
    print(f"two-node run: uninterrupted {t_ref:.0f} s, whole test {time.perf_counter() - t0:.0f} s")
