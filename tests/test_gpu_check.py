"""scripts/gpu_check.sh --dry-run: the prepared device check runs end to end on CPU (tiny shapes, Triton
under the interpreter, megatron step CPU vs CPU-with-Triton-interpreted), every part passes and it writes its
JSON and RESULT lines. On a GPU the same script runs the real shapes (docs/gpu.md)."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHON=os.environ.get("PYTHON", str(ROOT / ".venv/bin/python")))
    if not Path(env["PYTHON"]).exists():
        import sys

        env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: v.get("error", v) for k, v in report["parts"].items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert set(report["parts"]) == {"env", "kernels", "timings", "flex", "megatron"}
    assert report["dry_run"] is True
    assert all(c["ok"] for c in report["parts"]["kernels"]["checks"].values())
    assert report["parts"]["megatron"]["loss_rel_diff"] < 1e-4
    assert "RESULT dryrun_check_parts_ok 5 of_5" in proc.stdout
    assert "RESULT dryrun_fused_loss_fwd_bwd_speedup" in proc.stdout
