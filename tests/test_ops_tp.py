"""TP=2 vocab-parallel fused_target_logprob equals TP=1 (torchrun, gloo, 2 processes):
forward log-probs, the DAPO loss, the full grad_hidden (all-reduced inside the op) and the
gathered grad_weight shards. float64: relative 1e-9; float32: 1e-5."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_mcore import _C

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist" / "ops_tp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(impl: str, dtype: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"tp_{impl}_{dtype}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    if impl == "triton":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), "--impl", impl, "--dtype", dtype, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.parametrize("impl,dtype,tol", [("cpp", "float64", 1e-9), ("cpp", "float32", 1e-5),
                                            ("reference", "float64", 1e-9), ("triton", "float64", 1e-9)])
def test_tp2_equals_tp1(impl, dtype, tol, tmp_path):
    if impl == "cpp" and not _C.available():
        pytest.skip("C++ ops not built")
    results = _launch(impl, dtype, tmp_path)
    assert len(results) == 2
    for r in results:
        for key in ("logp", "loss", "grad_hidden", "grad_weight"):
            assert r[key] < tol, (r["rank"], key, r[key])
