"""The stage launcher (dapo_mcore/run/launch.py): a torchrun worker's failure surfaces as the first failing
rank's exception; the torchrun command lines of one node and of several; the head / follower protocol of a
multi-node run (announce, join, done, failed, a silent head)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dapo_mcore.cli import cluster_from_args, build_parser, main
from dapo_mcore.critic.train import CriticConfig
from dapo_mcore.run import launch as L
from dapo_mcore.run.launch import Cluster, Head, StageFailed, follow, launch, run_torchrun, torchrun_command
from dapo_mcore.run.stages import STAGE

ROOT = Path(__file__).resolve().parents[1]


def test_worker_entry_records_the_exception(tmp_path, monkeypatch):
    """``_worker JOB`` writes the rank's exception (type, message, where in our code, traceback) beside the job."""
    job = tmp_path / "critic.job.json"
    L.write_job(job, STAGE["critic"], CriticConfig(init_path=""), [str(tmp_path / "mc"), str(tmp_path / "critic")])
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="critic.init_path is required"):
        main(["_worker", str(job)])
    err = json.loads((tmp_path / "critic.logs" / "rank-3.json").read_text())
    assert (err["rank"], err["type"]) == (3, "ValueError") and "critic.init_path is required" in err["message"]
    assert err["where"].startswith("dapo_mcore/critic/train.py:") and err["where"].endswith("in run_train_critic")
    assert "Traceback" in err["traceback"]


@pytest.mark.dist
def test_one_rank_failing_under_torchrun_is_named(tmp_path):
    """Three gloo ranks; rank 1 raises inside the critic stage while the others wait in an all-reduce: the
    launcher's error is rank 1's exception and where it was raised, not 'exit 1'."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "--max-restarts=0",
           str(ROOT / "tests" / "dist" / "fail_worker.py"), str(logs), "1"]
    with pytest.raises(StageFailed) as e:
        run_torchrun(cmd, logs, "stage critic", log=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("stage critic failed on rank 1 (node ")
    assert "ValueError: critic.init_path is required" in msg
    assert "at dapo_mcore/critic/train.py:" in msg and "in run_train_critic" in msg
    # the other ranks' secondary errors (their peer went away) are recorded later, so they are not chosen
    errs = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in logs.glob("rank-*.json")}
    assert errs[1]["type"] == "ValueError"
    assert all(e["time"] > errs[1]["time"] for r, e in errs.items() if r != 1)


@pytest.mark.dist
def test_a_failing_stage_job_through_launch(tmp_path):
    """The pipeline's path: launch() writes the job, runs ``torchrun ... _worker JOB`` on 2 processes, and
    raises StageFailed with the first rank's exception."""
    job = tmp_path / "critic.job.json"
    with pytest.raises(StageFailed) as e:
        launch(STAGE["critic"], CriticConfig(init_path=""), [str(tmp_path / "mc"), str(tmp_path / "critic")], job,
               2, log=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("stage critic failed on rank ") and "ValueError: critic.init_path is required" in msg
    assert "at dapo_mcore/critic/train.py:" in msg


def test_torchrun_command_lines(tmp_path):
    job = tmp_path / "iter_0" / "critic.job.json"
    py = "/venv/bin/python"
    assert torchrun_command(4, job, python=py) == [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--max-restarts=0",
        "-m", "dapo_mcore.cli", "_worker", str(job)]
    c = Cluster(nnodes=4, node_rank=2, master_addr="node0", master_port=6000)
    assert torchrun_command(8, job, c, python=py) == [
        py, "-m", "torch.distributed.run", "--nnodes", "4", "--node-rank", "2", "--master-addr", "node0",
        "--master-port", "6000", "--nproc-per-node=8", "--max-restarts=0", "-m", "dapo_mcore.cli", "_worker",
        str(job)]
    assert "6001" in torchrun_command(8, job, c, port=6001, python=py)


def test_processes_per_node(tmp_path):
    from dapo_mcore.parallel.runtime import ParallelConfig

    par = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert L.processes(par, 1, Cluster()) == (4, 4)                 # one node: raised to TP x PP
    assert L.processes(par, 2, Cluster(nnodes=2)) == (2, 4)         # several: run.nproc per node
    with pytest.raises(L.LayoutError, match="3 nodes x run.nproc=1 = 3 is not a multiple"):
        L.processes(par, 1, Cluster(nnodes=3))
    with pytest.raises(L.LayoutError, match="run.nproc=6 is not a multiple"):
        L.processes(par, 6, Cluster())


def test_cluster_flags_and_environment():
    p = build_parser()
    a = p.parse_args(["run", "c.yaml", "--nnodes", "2", "--node-rank", "1", "--master-addr", "h0",
                      "--master-port", "7000"])
    assert cluster_from_args(a, {}) == Cluster(2, 1, "h0", 7000)
    a = p.parse_args(["train-actor", "c.yaml", "--nnodes", "3"])
    assert cluster_from_args(a, {"SLURM_NODEID": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "6100"}) == \
        Cluster(3, 2, "n0", 6100)
    assert cluster_from_args(p.parse_args(["run", "c.yaml"]), {"SLURM_NODEID": "1"}) == Cluster()
    with pytest.raises(Exception, match="--node-rank must be in 0..1"):
        cluster_from_args(p.parse_args(["run", "c.yaml", "--nnodes", "2", "--node-rank", "2"]), {})


def _fake_torchrun(monkeypatch, joined: threading.Event, calls: list, rc: int = 0):
    """subprocess.run of the launcher, recorded: the head's torchrun (node rank 0) returns once a follower
    joined (as a real static rendezvous does)."""
    def run(cmd, **kw):
        calls.append(cmd)
        if cmd[cmd.index("--node-rank") + 1] == "0":
            assert joined.wait(20), "no follower joined"
        else:
            joined.set()
        return subprocess.CompletedProcess(cmd, rc)
    monkeypatch.setattr(L.subprocess, "run", run)


def test_head_and_follower_protocol(tmp_path, monkeypatch):
    """The head announces two jobs and finishes; the follower joins each once, as node 1 with the head's
    nproc and port, and returns 0. A stale head file of a killed run is ignored."""
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    L.head_file(out).parent.mkdir(parents=True)
    L.atomic_write_json(L.head_file(out), {"session": "dead", "beat": 7, "state": "running",
                                           "launch": {"seq": 1, "job": "old.job.json", "nproc": 1, "port": 1}})
    calls: list = []
    cluster = Cluster(nnodes=2, master_addr="127.0.0.1", master_port=29999)
    rc: list = []
    fol = threading.Thread(target=lambda: rc.append(follow(Cluster(2, 1, "127.0.0.1", 29999), out,
                                                           log=lambda m: None, wait_s=30)))
    fol.start()
    time.sleep(0.5)
    with Head(cluster, out) as head:
        for name in ("critic", "actor"):
            joined = threading.Event()
            _fake_torchrun(monkeypatch, joined, calls)
            head.run(out / "iter_0" / f"{name}.job.json", 3, f"stage {name}", log=lambda m: None)
    fol.join(20)
    assert rc == [0]
    ranks = [(Path(c[-1]).name, c[c.index("--node-rank") + 1]) for c in calls]
    assert sorted(ranks) == sorted([("critic.job.json", "0"), ("critic.job.json", "1"), ("actor.job.json", "0"),
                                    ("actor.job.json", "1")])
    assert all("--nproc-per-node=3" in c and "29999" in c for c in calls)
    assert json.loads(L.head_file(out).read_text())["state"] == "done"


def test_follower_stops_when_the_head_fails_or_goes_silent(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    rc: list = []
    fol = threading.Thread(target=lambda: rc.append(follow(Cluster(2, 1), out, log=lambda m: None, wait_s=30)))
    fol.start()
    with pytest.raises(RuntimeError):
        with Head(Cluster(nnodes=2), out):
            time.sleep(0.5)
            raise RuntimeError("preflight found 1 problem(s)")
    fol.join(20)
    assert rc == [1]
    st = json.loads(L.head_file(out).read_text())
    assert st["state"] == "failed" and "preflight found" in st["error"]

    monkeypatch.setattr(L, "STALE_S", 0.5)          # a head that stopped writing (killed)
    out2 = tmp_path / "run2"
    rc2: list = []
    head = Head(Cluster(nnodes=2), out2)
    head.__enter__()
    fol = threading.Thread(target=lambda: rc2.append(follow(Cluster(2, 1), out2, log=lambda m: None, wait_s=30)))
    fol.start()
    time.sleep(0.5)
    head._stop.set()
    head._thread.join()
    fol.join(20)
    assert rc2 == [1]
