"""torchrun worker for tests/test_train_fast_paths.py: the emulated GPU fast paths in ``MegatronTrainer``,
each against the CPU path it replaces, on the tiny model (gloo).

Modes (argv[1]), every result written by rank 0 as JSON to OUT:
  single MODEL OUT          (1 process)  bf16 + fp32 main params vs fp32; updates below bf16 resolution;
                                          full and selective recompute vs none (loss, every gradient)
  dp MODEL OUT CKPT         (2 processes) recompute at TP=2; DP=2: distributed optimizer and overlapped
                                          grad reduce / param gather vs the synchronous plain optimizer;
                                          distributed-optimizer checkpoint with many DDP buckets at step 2
                                          of 4 (CKPT), and the same saved without the bucket-offset fix
                                          (CKPT/unfixed)
  resume MODEL OUT CKPT     (2 processes) a fresh process resumes CKPT and runs steps 3-4: with the same
                                          buckets, with one bucket, and CKPT/unfixed with the same buckets
  resume_shared_step ...    (2 processes) the first of those without the shared-``step`` fix
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation_worker import fixed_batch, lm_forward_step  # noqa: E402

from dapo_mcore.models.convert import collect_hf_state  # noqa: E402
from dapo_mcore.parallel.fast_paths import FastPathConfig  # noqa: E402
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel  # noqa: E402
from dapo_mcore.training.loop import load_chunks  # noqa: E402
from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig  # noqa: E402

PORTABLE = FastPathConfig(mode="cpu")
# emulate with every feature off: each test turns on the one it checks
EMU = FastPathConfig(mode="emulate", bf16=False, recompute="none", distributed_optimizer=False,
                     overlap_grad_reduce=False, overlap_param_gather=False, thd_packing=False)
# eps 1e-3: Adam with eps 1e-8 amplifies float noise in near-zero grads (notes); clip off
OPTIM = OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0)
TINY_STEPS = 20
# the checkpoint test runs the GPU configuration: bf16, distributed optimizer, overlapped reduce and gather
CKPT_PATHS = replace(EMU, bf16=True, distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
CKPT_BUCKET = 2000   # DDP bucket size of the checkpointed run: many buckets per grad buffer
RECOMPUTED = [0]   # backward passes of megatron's CheckpointFunction (recomputed forward segments)


def _count_recompute() -> None:
    from megatron.core.tensor_parallel.random import CheckpointFunction

    orig = CheckpointFunction.backward

    def backward(ctx, *grads):
        RECOMPUTED[0] += 1
        return orig(ctx, *grads)

    CheckpointFunction.backward = staticmethod(backward)


def trainer_for(model: str, fp: FastPathConfig, tp: int = 1, optim: OptimConfig = OPTIM, steps: int = 4,
                bucket_size=None) -> tuple:
    par = ParallelConfig(tensor_model_parallel_size=tp, fast_paths=fp)
    initialize_parallel(par)
    torch.manual_seed(0)
    arch, chunks = load_chunks(model, par)
    return arch, MegatronTrainer(chunks, optim, total_steps=steps, paths=par.paths(), bucket_size=bucket_size)


def run_steps(tr: MegatronTrainer, arch, n: int, dp_split: bool = False) -> list[float]:
    """``n`` steps on the fixed batches; with ``dp_split`` each DP rank takes its half of the micro-batches
    (the global batch is the same as one rank running all of them)."""
    from megatron.core import parallel_state as ps

    losses = []
    for _ in range(n):
        mbs = fixed_batch(tr.step + 1, arch.vocab_size)
        if dp_split:
            dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            mbs = mbs[r::dp]
        losses.append(tr.train_step(mbs, lm_forward_step).loss)
    return losses


def hf_params(tr: MegatronTrainer, arch) -> dict:
    tr.sync_params()
    return collect_hf_state(tr.chunks, arch, lambda n, p: p.detach().float())


def hf_main_params(tr: MegatronTrainer, arch) -> dict:
    """The optimizer's fp32 main copy of every param (``param.main_param``; the param itself if fp32)."""
    return collect_hf_state(tr.chunks, arch, lambda n, p: getattr(p, "main_param", None)
                            if getattr(p, "main_param", None) is not None else p.detach())


def hf_grads(tr: MegatronTrainer, arch) -> dict:
    return collect_hf_state(tr.chunks, arch, lambda n, p: p.main_grad)


def rel_diff(a: dict | None, b: dict | None) -> float:
    """max over tensors of max|a - b| / max|b| (0 on ranks other than 0)."""
    if a is None or b is None:
        return 0.0
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)).item()
               for k in a)


def abs_diff(a: dict | None, b: dict | None) -> float:
    if a is None or b is None:
        return 0.0
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def step_grads(model: str, fp: FastPathConfig, tp: int = 1) -> tuple[float, dict]:
    arch, tr = trainer_for(model, fp, tp)
    loss = run_steps(tr, arch, 1)[0]
    return loss, hf_grads(tr, arch)


# ---------------------------------------------------------------------------------------------- single
def single(model: str) -> dict:
    res: dict = {}
    # (1) bf16 params + fp32 main params vs fp32, 3 steps
    arch, fp32 = trainer_for(model, EMU)
    l32 = run_steps(fp32, arch, 3)
    p32 = hf_params(fp32, arch)
    arch, bf = trainer_for(model, replace(EMU, bf16=True))
    opt = bf.optimizer.chained_optimizers[0] if hasattr(bf.optimizer, "chained_optimizers") else bf.optimizer
    res["optimizer"] = type(opt).__name__
    res["model_dtypes"] = sorted({str(p.dtype) for c in bf.chunks for p in c.parameters()})
    res["linear_dtypes"] = sorted({str(p.dtype) for c in bf.chunks for n, p in c.named_parameters()
                                   if "norm" not in n})
    res["main_dtypes"] = sorted({str(p.dtype) for g in opt.optimizer.param_groups for p in g["params"]})
    res["grad_buffer_dtypes"] = sorted({str(p.main_grad.dtype) for c in bf.chunks for p in c.parameters()})
    lbf = run_steps(bf, arch, 3)
    res["bf16_loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(lbf, l32))
    res["bf16_main_param_absdiff"] = abs_diff(hf_main_params(bf, arch), p32)
    res["bf16_param_is_rounded_main"] = all(
        torch.equal(p.detach(), p.main_param.to(p.dtype)) for c in bf.chunks for p in c.parameters()
        if getattr(p, "main_param", None) is not None)
    # (2) tiny updates: lr 1e-5 moves a weight by ~1e-5 per Adam step, below half a bf16 ulp of most weights
    # (~6e-5 at |w| ~ 0.02). The fp32 main params accumulate them (20 steps: ~2e-4, visible in bf16);
    # bf16 params updated directly (p <- bf16(p + update), the same updates) round most of them away.
    tiny = replace(OPTIM, lr=1e-5)
    arch, bf = trainer_for(model, replace(EMU, bf16=True), optim=tiny, steps=TINY_STEPS)
    params = [p for c in bf.chunks for p in c.parameters() if getattr(p, "main_param", None) is not None]
    start = [p.detach().clone() for p in params]
    main_prev = [p.main_param.detach().clone() for p in params]
    naive = [p.detach().clone() for p in params]
    for _ in range(TINY_STEPS):
        run_steps(bf, arch, 1)
        for i, p in enumerate(params):
            upd = p.main_param.detach() - main_prev[i]
            naive[i] = (naive[i].float() + upd).to(torch.bfloat16)
            main_prev[i] = p.main_param.detach().clone()
    n = sum(p.numel() for p in params)
    res["tiny_lr_changed_fp32_main"] = sum(int((p.detach() != s).sum()) for p, s in zip(params, start)) / n
    res["tiny_lr_changed_bf16_only"] = sum(int((q != s).sum()) for q, s in zip(naive, start)) / n
    res["tiny_lr_main_moved"] = sum(int((p.main_param.float() != s.float()).sum())
                                    for p, s in zip(params, start)) / n
    # how much of the fp32 main params' total movement reached the bf16 weights
    moved = sum(float((p.main_param.float() - s.float()).abs().sum()) for p, s in zip(params, start))
    res["tiny_lr_reached_fp32_main"] = sum(float((p.float() - s.float()).abs().sum())
                                           for p, s in zip(params, start)) / moved
    res["tiny_lr_reached_bf16_only"] = sum(float((q.float() - s.float()).abs().sum())
                                           for q, s in zip(naive, start)) / moved
    # (3) activation recompute, fp32: loss and every gradient of one step
    l0, g0 = step_grads(model, EMU)
    res["recompute_none_recomputed"] = RECOMPUTED[0]
    for gran in ("full", "selective"):
        fp = replace(EMU, recompute=gran)
        arch, tr = trainer_for(model, fp)
        cfg = tr.chunks[0].config
        res[f"recompute_{gran}_config"] = [cfg.recompute_granularity, cfg.recompute_method]
        RECOMPUTED[0] = 0
        loss = run_steps(tr, arch, 1)[0]
        res[f"recompute_{gran}_recomputed"] = RECOMPUTED[0]
        res[f"recompute_{gran}_loss_rel"] = abs(loss - l0) / abs(l0)
        res[f"recompute_{gran}_grad_rel"] = rel_diff(hf_grads(tr, arch), g0)
    return res


# -------------------------------------------------------------------------------------------------- dp
def dp(model: str, ckpt: str) -> dict:
    from dapo_mcore.training.checkpoint import save_checkpoint

    res: dict = {}
    # (1) recompute at TP=2 (world 2 = TP 2 x DP 1)
    l0, g0 = step_grads(model, EMU, tp=2)
    RECOMPUTED[0] = 0
    l1, g1 = step_grads(model, replace(EMU, recompute="full"), tp=2)
    res["tp2_recomputed"] = RECOMPUTED[0]
    res["tp2_recompute_loss_rel"] = abs(l1 - l0) / abs(l0)
    res["tp2_recompute_grad_rel"] = rel_diff(g1, g0)
    # (2) DP=2: reference = synchronous reduce + plain megatron optimizer
    variants = {
        "sync": (EMU, None),
        "overlap_grad": (replace(EMU, overlap_grad_reduce=True), 2000),
        "distopt": (replace(EMU, distributed_optimizer=True), None),
        "distopt_overlap": (replace(EMU, distributed_optimizer=True, overlap_grad_reduce=True,
                                    overlap_param_gather=True), 2000),
    }
    ref_grads = ref_params = None
    for name, (fp, bucket) in variants.items():
        arch, tr = trainer_for(model, fp, bucket_size=bucket)
        res[f"{name}_buckets"] = sum(len(c.bucket_groups) for c in tr.chunks)
        losses = run_steps(tr, arch, 1, dp_split=True)
        grads = None if fp.distributed_optimizer else hf_grads(tr, arch)   # dist-opt: only a grad shard
        losses += run_steps(tr, arch, 2, dp_split=True)
        params = hf_params(tr, arch)
        if name == "sync":
            ref_grads, ref_params, ref_losses = grads, params, losses
            continue
        res[f"{name}_loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        if grads is not None:
            res[f"{name}_grad_rel"] = rel_diff(grads, ref_grads)
        res[f"{name}_param_rel"] = rel_diff(params, ref_params)
        res[f"{name}_param_abs"] = abs_diff(params, ref_params)
    # (3) the distributed optimizer (bf16 + overlap: the GPU configuration, many buckets) checkpointed at
    # step 2 of 4; first without the bucket-offset workaround (megatron-core 0.16 as is), to show what it fixes
    from dapo_mcore.training import checkpoint

    arch, tr = trainer_for(model, CKPT_PATHS, bucket_size=CKPT_BUCKET)
    res["ckpt_buckets"] = [len(b.buckets) for c in tr.chunks for b in c.buffers]
    res["ckpt_params_moved_by_fix"] = sum(
        m != b.param_index_map[p] for c in tr.chunks for b in c.buffers
        for p, m in checkpoint.gathered_param_index_map(b).items())
    run_steps(tr, arch, 2, dp_split=True)
    fix = checkpoint.fix_bucket_padding_offsets
    checkpoint.fix_bucket_padding_offsets = lambda trainer: None
    try:
        save_checkpoint(tr, Path(ckpt) / "unfixed", extra={"note": "unfixed"})
    finally:
        checkpoint.fix_bucket_padding_offsets = fix
    save_checkpoint(tr, ckpt, extra={"note": "fast paths"})
    res["uninterrupted_losses"] = run_steps(tr, arch, 2, dp_split=True)
    params = hf_params(tr, arch)
    if params is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in params.items()}, str(Path(ckpt) / "uninterrupted.safetensors"))
    res["uninterrupted_adam_steps"] = adam_steps(tr)
    return res


def adam_steps(tr: MegatronTrainer) -> list[float]:
    """The distinct Adam ``step`` counts in the optimizer state (bias correction uses them)."""
    steps = set()
    for opt in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer]):
        for st in opt.optimizer.state.values():
            if "step" in st:
                steps.add(float(st["step"]))
    return sorted(steps)


def resume(model: str, ckpt: str, unshare: bool = True) -> dict:
    """Resume at step 2 in this fresh process (same buckets as the save), run steps 3-4; ``unshare=False``
    disables the shared-``step`` workaround (:func:`dapo_mcore.training.checkpoint.unshare_adam_steps`) to
    show what it fixes and skips the rest. Then the same checkpoint into one bucket per buffer, and the
    checkpoint saved without :func:`~dapo_mcore.training.checkpoint.fix_bucket_padding_offsets`."""
    from safetensors.torch import load_file

    from dapo_mcore.training import checkpoint

    if not unshare:
        checkpoint.unshare_adam_steps = lambda trainer: 0

    def resumed(path: Path, bucket_size) -> tuple:
        arch, tr = trainer_for(model, CKPT_PATHS, bucket_size=bucket_size)
        ref = load_file(str(Path(ckpt) / "uninterrupted.safetensors")) if torch.distributed.get_rank() == 0 else None
        extra = checkpoint.load_checkpoint(tr, checkpoint.latest_checkpoint(path))
        r = {"step": tr.step, "extra": extra, "adam_steps_after_load": adam_steps(tr),
             "buckets": [len(b.buckets) for c in tr.chunks for b in c.buffers]}
        r["losses"] = run_steps(tr, arch, 2, dp_split=True)
        r["adam_steps_after_2_more"] = adam_steps(tr)
        r["param_abs"] = abs_diff(hf_params(tr, arch), ref)
        return tr, r

    _, r = resumed(Path(ckpt), CKPT_BUCKET)
    res = {"resumed_step": r["step"], "extra": r["extra"], "resume_buckets": r["buckets"],
           "adam_steps_after_load": r["adam_steps_after_load"], "resumed_losses": r["losses"],
           "adam_steps_after_2_more": r["adam_steps_after_2_more"], "resume_param_abs": r["param_abs"]}
    if not unshare:
        return res
    tr, res["one_bucket"] = resumed(Path(ckpt), None)
    res["one_bucket_map_unchanged"] = all(checkpoint.gathered_param_index_map(b) == b.param_index_map
                                          for c in tr.chunks for b in c.buffers)
    _, res["unfixed"] = resumed(Path(ckpt) / "unfixed", CKPT_BUCKET)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("single", "dp", "resume", "resume_shared_step"))
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("ckpt", nargs="?")
    a = ap.parse_args()
    torch.set_num_threads(1)
    _count_recompute()
    if a.mode == "single":
        res = single(a.model)
    elif a.mode == "dp":
        res = dp(a.model, a.ckpt)
    else:
        res = resume(a.model, a.ckpt, unshare=a.mode == "resume")
    if torch.distributed.get_rank() == 0:
        Path(a.out).write_text(json.dumps(res, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
