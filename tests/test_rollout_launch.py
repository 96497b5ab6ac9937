"""scripts/launch_sglang.sh --dry-run prints the exact server and router commands."""
from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch_sglang.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)


def test_dry_run_two_servers_tp2_with_router():
    r = run("--model", "/ckpt/m", "--servers", "2", "--tp", "2", "--dry-run", "--", "--context-length", "4096")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=0,1 python3 -m sglang.launch_server --model-path /ckpt/m")
    assert lines[1].startswith("CUDA_VISIBLE_DEVICES=2,3 ") and "--port 30002" in lines[1]
    assert all("--tp-size 2" in x and "--context-length 4096" in x for x in lines[:2])
    assert lines[2] == ("sglang-router launch --host 127.0.0.1 --port 30000 --worker-urls "
                        "http://127.0.0.1:30001 http://127.0.0.1:30002 --policy cache_aware --prometheus-host 127.0.0.1")
    assert lines[3] == "# rollout backend url: http://127.0.0.1:30000"


def test_single_server_no_router_and_errors():
    r = run("--model", "m", "--dp", "2", "--dry-run")
    assert r.returncode == 0 and "CUDA_VISIBLE_DEVICES=0,1 " in r.stdout and "sglang-router" not in r.stdout
    assert run("--dry-run").returncode == 2
    bad = run("--model", "m", "--tp", "0", "--dry-run")
    assert bad.returncode == 2 and "--tp must be a positive integer" in bad.stderr
