"""TP=2 vocab-parallel fused_target_logprob and fused_dapo_loss equal TP=1 (torchrun, gloo, 2 processes):
forward log-probs, the DAPO loss, the full grad_hidden (all-reduced inside the ops) and the gathered
grad_weight shards (the fused loss: added into main_grad, per-chunk all-reduces). float64: relative 1e-9;
float32: 1e-5."""
import json
from pathlib import Path

import pytest


def _launch(torchrun, impl: str, dtype: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"tp_{impl}_{dtype}.json"
    env = {"TRITON_INTERPRET": "1"} if impl == "triton" else None
    torchrun("ops_tp_worker.py", 2, "--impl", impl, "--dtype", dtype, "--out", out, timeout=300, env=env)
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.parametrize("impl,dtype,tol", [("cpp", "float64", 1e-9), ("cpp", "float32", 1e-5),
                                            ("reference", "float64", 1e-9), ("triton", "float64", 1e-9)])
def test_tp2_equals_tp1(impl, dtype, tol, torchrun, tmp_path):
    results = _launch(torchrun, impl, dtype, tmp_path)
    assert len(results) == 2
    for r in results:
        for key in ("logp", "loss", "grad_hidden", "grad_weight", "fused_loss", "fused_log_ratio", "fused_logp",
                    "fused_grad_hidden", "fused_grad_weight", "fused_vs_per_token_loss"):
            assert r[key] < tol, (r["rank"], key, r[key])

