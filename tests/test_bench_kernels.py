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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunk_profile_tiny(dtype, capsys):
    _bench().chunk_profile((dtype,), T=64, H=32, V=1000, chunks=(16, 32))
    out = capsys.readouterr().out
    for c in (16, 32):
        assert f"RESULT cpu_{dtype}_chunk{c}_mm_rate_fraction " in out
        assert f"RESULT cpu_{dtype}_chunk{c}_projected_floor_fraction " in out
    assert out.count(f"| {dtype} |") == 2
