"""Multi-node launchers: --dry-run prints the exact commands; layout flags are checked and forwarded the
same way everywhere; a real two-"node" torchrun job on 127.0.0.1 (gloo, TP=2 across the nodes)."""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_torchrun.sh"
SBATCH = ROOT / "scripts" / "slurm_dapo.sbatch"
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                         "NPROC_PER_NODE", "PYTHON", "DAPO_SCRIPTS")}


def run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env={**CLEAN_ENV, **env},
                          timeout=60)


def test_torchrun_dry_run_exact_command():
    r = run(LAUNCH, "--nnodes", "4", "--node-rank", "1", "--master-addr", "node0", "--master-port", "6000",
            "--nproc-per-node", "8", "--tp", "8", "--pp", "4", "--vpp", "2", "--dp", "1", "--sequence-parallel",
            "--micro-batch", "1", "--global-batch", "512", "--recompute", "full", "--dry-run",
            "--", "python", "-m", "dapo_mcore.cli", "train-critic", "run dir/cfg.yaml", "critic.lr=1e-6")
    assert r.returncode == 0, r.stderr
    cmd, note = r.stdout.strip().splitlines()
    assert shlex.split(cmd) == [
        "python3", "-m", "torch.distributed.run", "--nnodes", "4", "--node-rank", "1", "--master-addr", "node0",
        "--master-port", "6000", "--nproc-per-node", "8", "-m", "dapo_mcore.cli", "train-critic", "run dir/cfg.yaml",
        "critic.lr=1e-6", "--tp", "8", "--pp", "4", "--vpp", "2", "--sequence-parallel", "--micro-batch", "1",
        "--global-batch", "512", "--recompute", "full"]
    assert note == "# world 32 = TP 8 x PP 4 x DP 1; node 1 of 4"


def test_torchrun_env_defaults_and_command_forms():
    r = run(LAUNCH, "--dry-run", "--", "dapo-mcore", "train-actor", "cfg.yaml",
            NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="7000", NPROC_PER_NODE="4",
            PYTHON="/venv/bin/python")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.splitlines()[0]) == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--master-addr",
        "10.0.0.1", "--master-port", "7000", "--nproc-per-node", "4", "--no-python", "dapo-mcore", "train-actor", "cfg.yaml"]
    r = run(LAUNCH, "--nproc-per-node", "2", "--dry-run", "--", "tests/x.py", "--a", SLURM_NNODES="1",
            SLURM_NODEID="0")
    assert "--nproc-per-node 2 tests/x.py --a" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--nproc-per-node", "8", "--tp", "3"], "TP x PP = 3 x 1 does not divide the world size 8"),
    (["--nproc-per-node", "8", "--tp", "2", "--dp", "2"], "--dp 2 != world / (TP x PP) = 8 / 2 = 4"),
    (["--nproc-per-node", "2", "--sequence-parallel"], "--sequence-parallel requires --tp > 1"),
    (["--nproc-per-node", "2", "--vpp", "2"], "--vpp needs --pp >= 2"),
    (["--nproc-per-node", "4", "--global-batch", "6"], "--global-batch 6 is not a multiple of micro-batch x DP = 1 x 4"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be in 0..1"),
    (["--recompute", "some"], "--recompute must be none or full"),
    (["--tp", "x"], "--tp must be a positive integer"),
    (["--bogus"], "unknown option --bogus"),
])
def test_torchrun_layout_errors(args, msg):
    r = run(LAUNCH, *args, "--dry-run", "--", "x.py")
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert run(LAUNCH, "--dry-run").returncode == 2          # no command


def test_sbatch_dry_run_prints_srun_and_every_node():
    """Every node runs the same dapo-mcore command with the allocation's rendezvous appended (its rank is
    $SLURM_NODEID); node 0 runs the stage graph."""
    r = run(SBATCH, "--nodes", "2", "--dry-run", "--", "dapo-mcore", "run", "a b.yaml", "critic.lr=1e-6",
            MASTER_ADDR="n0", MASTER_PORT="6001")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    full = ["dapo-mcore", "run", "a b.yaml", "critic.lr=1e-6", "--nnodes", "2", "--master-addr", "n0",
            "--master-port", "6001"]
    assert shlex.split(lines[0]) == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", *full]
    for r_ in (0, 1):
        i = lines.index(f"# node {r_} runs (SLURM_NODEID={r_}):")
        assert shlex.split(lines[i + 1]) == full


@pytest.mark.parametrize("args,msg", [
    (["--dry-run"], "no command"),
    (["--nodes", "x", "--dry-run", "--", "dapo-mcore", "run", "c.yaml"], "--nodes must be a positive integer"),
    (["--dry-run", "--", "dapo-mcore", "run", "c.yaml", "--node-rank", "1"], "--node-rank is set by this script"),
    (["--tp", "8", "--dry-run", "--", "dapo-mcore", "run", "c.yaml"], "unknown option --tp"),
])
def test_sbatch_errors(args, msg):
    r = run(SBATCH, *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_sbatch_reads_the_allocation_and_the_cli_takes_its_rank():
    r = run(SBATCH, "--dry-run", "--", "dapo-mcore", "train-actor", "c.yaml", SLURM_NNODES="3",
            SLURM_JOB_ID="123456", MASTER_ADDR="h1")
    assert r.returncode == 0, r.stderr
    assert "--nnodes 3 --master-addr h1 --master-port 23456" in r.stdout
    assert r.stdout.count("runs (SLURM_NODEID=") == 3
    from dapo_mcore.cli import build_parser, cluster_from_args
    from dapo_mcore.run.launch import Cluster

    a = build_parser().parse_args(shlex.split(r.stdout.splitlines()[-1])[1:])
    assert cluster_from_args(a, {"SLURM_NODEID": "2"}) == Cluster(3, 2, "h1", 23456)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_nodes_on_one_machine_tp2_across_nodes():
    """Two launcher processes (node ranks 0 and 1, one process each) rendezvous on 127.0.0.1 and build the
    tiny models with TP=2 across the "nodes": every rank's parameter count equals the planner's."""
    port = str(_free_port())
    env = {**CLEAN_ENV, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(["bash", str(LAUNCH), "--nnodes", "2", "--node-rank", str(r), "--master-addr",
                               "127.0.0.1", "--master-port", port, "--nproc-per-node", "1", "--tp", "2", "--",
                               "python", "-m", "dapo_mcore.plan.verify", "params"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    line = next(x for x in outs[0].splitlines() if "PLAN_PARAMS " in x)
    rows = json.loads(line.split("PLAN_PARAMS ", 1)[1])
    assert sorted({r["tp_rank"] for r in rows}) == [0, 1] and len(rows) == 8
    assert all(r["real"] == r["predicted"] for r in rows), rows
