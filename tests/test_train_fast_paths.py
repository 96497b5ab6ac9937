"""The emulated GPU fast paths in MegatronTrainer (``fast_paths.mode="emulate"``), each against the CPU path
it replaces, on the tiny model under torchrun (gloo). Worker: tests/dist/fast_paths_worker.py."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.dist


def test_bf16_and_recompute_single_process(tiny_qwen2, torchrun, tmp_path):
    out = tmp_path / "single.json"
    torchrun("fast_paths_worker.py", 1, "single", tiny_qwen2, out)
    r = json.loads(out.read_text())
    # bf16 params, fp32 main params in megatron's Float16OptimizerWithFloat16Params, fp32 grad buffers
    assert r["optimizer"] == "Float16OptimizerWithFloat16Params"
    assert r["model_dtypes"] == ["torch.bfloat16"] and r["main_dtypes"] == ["torch.float32"]
    assert r["grad_buffer_dtypes"] == ["torch.float32"]
    assert r["bf16_param_is_rounded_main"]
    # 3 steps (lr 1e-3): losses within 1e-3 relative of fp32, fp32 main params within 2e-3 absolute
    assert r["bf16_loss_rel"] <= 1e-3
    assert r["bf16_main_param_absdiff"] <= 2e-3
    # updates below bf16 resolution: the fp32 main copy accumulates them, bf16 params alone lose most
    assert r["tiny_lr_main_moved"] > 0.99
    assert r["tiny_lr_reached_fp32_main"] > 0.4
    assert r["tiny_lr_reached_bf16_only"] < 0.2
    assert r["tiny_lr_reached_fp32_main"] > 4 * r["tiny_lr_reached_bf16_only"]
    # activation recompute really recomputes (CheckpointFunction backward ran) and changes nothing
    assert r["recompute_none_recomputed"] == 0
    for gran in ("full", "selective"):
        assert r[f"recompute_{gran}_config"][0] == gran
        assert r[f"recompute_{gran}_recomputed"] > 0
        assert r[f"recompute_{gran}_loss_rel"] <= 1e-6 and r[f"recompute_{gran}_grad_rel"] <= 1e-6


def test_tp2_recompute_dp2_distopt_overlap_and_resume(tiny_qwen2, torchrun, tmp_path):
    out, ckpt = tmp_path / "dp.json", tmp_path / "ckpt"
    torchrun("fast_paths_worker.py", 2, "dp", tiny_qwen2, out, ckpt)
    r = json.loads(out.read_text())
    assert r["tp2_recomputed"] > 0
    assert r["tp2_recompute_loss_rel"] <= 1e-6 and r["tp2_recompute_grad_rel"] <= 1e-6
    # DP=2 vs the synchronous plain optimizer: 3 steps, grads (where whole) and params
    assert r["overlap_grad_buckets"] > 1 and r["distopt_overlap_buckets"] > 1      # bucketed
    for name in ("overlap_grad", "distopt", "distopt_overlap"):
        assert r[f"{name}_loss_rel"] <= 1e-6, name
        assert r[f"{name}_param_rel"] <= 1e-6, name
    assert r["overlap_grad_grad_rel"] <= 1e-6
    # the checkpointed run has many DDP buckets per grad buffer; the bucket-offset fix moves most params
    assert all(n > 10 for n in r["ckpt_buckets"]) and r["ckpt_params_moved_by_fix"] > 10
    assert r["uninterrupted_adam_steps"] == [4.0]

    res = tmp_path / "resume.json"
    torchrun("fast_paths_worker.py", 2, "resume", tiny_qwen2, res, ckpt)
    s = json.loads(res.read_text())
    # resume with the same buckets: exactly the uninterrupted run
    assert s["resume_buckets"] == r["ckpt_buckets"]
    assert s["resumed_step"] == 2 and s["extra"] == {"note": "fast paths"}
    assert s["adam_steps_after_load"] == [2.0] and s["adam_steps_after_2_more"] == [4.0]
    assert s["resumed_losses"] == r["uninterrupted_losses"]
    assert s["resume_param_abs"] == 0.0
    # the same checkpoint into one bucket per buffer (model-space state: any bucket layout; at DP=2 each grad
    # element is the same two-term sum in any bucketing, so exact too); the fix is the identity there
    one = s["one_bucket"]
    assert one["buckets"] == [1] * len(r["ckpt_buckets"]) and s["one_bucket_map_unchanged"]
    assert one["step"] == 2 and one["adam_steps_after_2_more"] == [4.0]
    assert one["losses"] == r["uninterrupted_losses"]
    assert one["param_abs"] == 0.0
    # what the fix does: saved by megatron-core 0.16 as is, the state of the buckets after the first is
    # misplaced and the resumed params leave the uninterrupted run's
    bad = s["unfixed"]
    assert bad["step"] == 2 and bad["param_abs"] > 0.1


@pytest.mark.slow
def test_resume_without_step_fix_is_wrong(tiny_qwen2, torchrun, tmp_path):
    """What unshare_adam_steps fixes: without it the shared Adam step counter races ahead after a resume
    and the params leave the uninterrupted run's."""
    out, ckpt = tmp_path / "dp.json", tmp_path / "ckpt"
    torchrun("fast_paths_worker.py", 2, "dp", tiny_qwen2, out, ckpt)
    res = tmp_path / "bad.json"
    torchrun("fast_paths_worker.py", 2, "resume_shared_step", tiny_qwen2, res, ckpt)
    s = json.loads(res.read_text())
    assert s["adam_steps_after_2_more"] != [4.0]
    assert s["resume_param_abs"] > 1e-4
