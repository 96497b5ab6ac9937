"""TP=2 vocab-parallel fused_target_logprob equals TP=1 (torchrun, gloo, 2 processes):
forward log-probs, the DAPO loss, the full grad_hidden (all-reduced inside the op) and the
gathered grad_weight shards. float64: relative 1e-9; float32: 1e-5."""
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
        for key in ("logp", "loss", "grad_hidden", "grad_weight"):
            assert r[key] < tol, (r["rank"], key, r[key])

