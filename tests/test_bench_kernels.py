"""scripts/bench_kernels.py's chunk profile runs end to end at a tiny shape and prints its RESULT lines
(the full-shape figures are in docs/kernels.md; timings are never asserted)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "scripts" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype,block_v", [("float32", None), ("bfloat16", None), ("bfloat16", 128)])
def test_chunk_profile_tiny(dtype, block_v, capsys):
    _bench().chunk_profile((dtype,), T=64, H=32, V=1000, chunks=(16, 32), block_v=block_v)
    out = capsys.readouterr().out
    from dapo_mcore.ops.cpp_backend import BLOCK_V

    assert f"(block_v {block_v or BLOCK_V})" in out
    for c in (16, 32):
        assert f"RESULT cpu_{dtype}_chunk{c}_mm_rate_fraction " in out
        assert f"RESULT cpu_{dtype}_chunk{c}_projected_floor_fraction " in out
    assert out.count(f"| {dtype} |") == 2


@pytest.mark.parametrize("chunk_mib", [0, 3])
def test_loss_case_passes_chunk_budget(chunk_mib, monkeypatch):
    """--chunk-mib reaches fused_dapo_loss as chunk_bytes (0: None, the op's default)."""
    import dapo_mcore.ops as ops

    seen, real = [], ops.fused_dapo_loss

    def spy(*a, **k):
        seen.append(k.get("chunk_bytes"))
        return real(*a, **k)

    monkeypatch.setattr(ops, "fused_dapo_loss", spy)
    b = _bench()
    out = b.run_case(b.Case(64, 32, 1000, "float32", "cpu", "loss_fused", "fwd_bwd", "main_grad", 0, 1,
                            chunk_mib=chunk_mib))
    assert seen == [(chunk_mib << 20) or None]
    assert out["case"]["chunk_mib"] == chunk_mib and out["time_s"] > 0
