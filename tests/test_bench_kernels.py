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


@pytest.mark.parametrize("dtype,block_v", [("float32", None), ("bfloat16", None), ("bfloat16", 256)])
def test_chunk_profile_tiny(dtype, block_v, capsys):
    _bench().chunk_profile((dtype,), T=64, H=32, V=1000, chunks=(16, 32), block_v=block_v)
    out = capsys.readouterr().out
    from dapo_mcore.ops.cpp_backend import LOSS_BLOCK_V

    assert f"(block_v {block_v or LOSS_BLOCK_V})" in out
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


def test_loss_case_sets_cpu_block_v(monkeypatch):
    """--block-v reaches the fused loss's C++ kernels for the case (both calls, and the chunk budget) and the
    backend's default is restored after it; other variants refuse it."""
    from dapo_mcore.ops import cpp_backend

    default, seen = cpp_backend.LOSS_BLOCK_V, []
    for name in ("fused_loss_logits", "fused_loss_grads", "fused_loss_bytes_per_token"):
        real = getattr(cpp_backend, name)

        def spy(*a, _real=real, _name=name, **k):
            seen.append((_name, cpp_backend.LOSS_BLOCK_V))
            return _real(*a, **k)

        monkeypatch.setattr(cpp_backend, name, spy)
    b = _bench()
    out = b.run_case(b.Case(64, 32, 1000, "float32", "cpu", "loss_fused", "fwd_bwd", "main_grad", 0, 1,
                            block_v=64))
    assert {n for n, _ in seen} == {"fused_loss_logits", "fused_loss_grads", "fused_loss_bytes_per_token"}
    assert {bv for _, bv in seen} == {64} and out["case"]["block_v"] == 64
    assert cpp_backend.LOSS_BLOCK_V == default
    with pytest.raises(ValueError, match="loss_fused variant only"):
        b.run_case(b.Case(64, 32, 1000, "float32", "cpu", "loss_naive", "fwd_bwd", "main_grad", 0, 1, block_v=128))
    assert cpp_backend.LOSS_BLOCK_V == default


def test_loss_rows_block_v_result_names(monkeypatch, capsys):
    """The loss rows pass --block-v to the fused variant only and name their RESULT lines _blockv<N>."""
    b = _bench()
    cases = []

    def fake_spawn(c):
        cases.append(c)
        return {"case": {}, "time_s": 1.0, "cpu_s": 1.0, "peak_mib": 10.0}

    monkeypatch.setattr(b, "spawn", fake_spawn)
    b.main(["--what", "loss", "--quick", "--block-v", "256"])
    out = capsys.readouterr().out
    assert {(c.variant, c.block_v) for c in cases} == {("loss_naive", 0), ("loss_chunked", 0),
                                                       ("loss_fused", 256), ("gemm_floor", 0)}
    assert "RESULT cpu_quick_fused_loss_fwd_bwd_speedup_blockv256 1.00 x" in out
