"""torchrun worker for the foundation tests (gloo on CPU).

Modes (argv[1]):
  logits    TP PP MODEL OUT            full-vocab logits of a fixed batch -> OUT (torch.save, rank 0)
  roundtrip TP PP MODEL OUT            HF -> megatron(TP, PP) -> HF checkpoint at OUT
  train     TP PP MODEL OUT [--steps N] [--save-at K --ckpt DIR] [--load DIR] [--vpp V]
            LM training steps on fixed synthetic batches; rank 0 writes OUT/losses.json and
            OUT/grads_step1.safetensors (HF-named gradients of the first step run)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dapo_mcore.models.convert import collect_hf_state, load_hf_weights, save_hf_checkpoint
from dapo_mcore.models.gpt import build_model_chunks
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.parallel.runtime import ParallelConfig, destroy_parallel, initialize_parallel

SEQ, MBS, NUM_MB = 16, 2, 4


def fixed_batch(step: int, vocab: int, n_mb: int = NUM_MB) -> list[dict]:
    """Deterministic micro-batches for ``step`` (same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    mbs = []
    for _ in range(n_mb):
        ids = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
        mask = torch.ones(MBS, SEQ)
        mask[1, SEQ - 5:] = 0  # a few unlabelled tokens
        mbs.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous(), "loss_mask": mask})
    return mbs


def lm_forward_step(model, batch):
    from megatron.core import tensor_parallel

    from dapo_mcore.training.trainer import make_loss_fn

    logits = model(batch["input_ids"], batch["position_ids"], None)

    def compute(out):
        if out.dim() != 3:  # non-last PP stage never calls loss_fn
            raise RuntimeError("unexpected output")
        tok = tensor_parallel.vocab_parallel_cross_entropy(out.float().transpose(0, 1).contiguous(),
                                                           batch["labels"].t().contiguous()).t()
        mask = batch["loss_mask"]
        return (tok * mask).sum(), mask.sum().int(), {}

    return logits, make_loss_fn(compute)


def gather_full_logits(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("tp", type=int)
    ap.add_argument("pp", type=int)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                       virtual_pipeline_model_parallel_size=args.vpp))
    arch = load_arch(args.model)
    cfg = transformer_config(arch, tp=args.tp, pp=args.pp, vpp=args.vpp)
    chunks = build_model_chunks(arch, cfg)
    load_hf_weights(chunks, args.model, arch)
    rank = torch.distributed.get_rank()
    out = Path(args.out)

    if args.mode == "logits":
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, arch.vocab_size, (3, 21), generator=g)
        pos = torch.arange(21).expand(3, 21)
        with torch.no_grad():
            logits = gather_full_logits(chunks[0](ids, pos, None))
        if rank == 0:
            torch.save({"ids": ids, "logits": logits}, out)
    elif args.mode == "roundtrip":
        save_hf_checkpoint(chunks, out, arch, source_dir=args.model, max_shard_bytes=200_000)
    elif args.mode == "train":
        from dapo_mcore.training.checkpoint import load_checkpoint, save_checkpoint
        from dapo_mcore.training.trainer import MegatronTrainer, OptimConfig

        # eps 1e-3: Adam with eps 1e-8 amplifies float noise in near-zero grads (notes); clip off so the
        # grads read after the step are the raw ones.
        trainer = MegatronTrainer(chunks, OptimConfig(lr=args.lr, adam_eps=1e-3, clip_grad=0.0), total_steps=args.steps)
        if args.load:
            load_checkpoint(trainer, args.load)
        losses = {}
        first = True
        while trainer.step < args.steps:
            step = trainer.step + 1
            res = trainer.train_step(fixed_batch(step, arch.vocab_size), lm_forward_step)
            losses[step] = res.loss
            if first:
                grads = collect_hf_state(trainer.chunks, arch, lambda n, p: p.main_grad)
                if rank == 0:
                    from safetensors.torch import save_file

                    out.mkdir(parents=True, exist_ok=True)
                    save_file({k: v.contiguous() for k, v in grads.items()}, str(out / "grads_step1.safetensors"))
                first = False
            if args.save_at and trainer.step == args.save_at:
                save_checkpoint(trainer, args.ckpt, extra={"note": "test"})
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "losses.json").write_text(json.dumps(losses))
    else:
        raise SystemExit(f"unknown mode {args.mode}")
    destroy_parallel()


if __name__ == "__main__":
    main()
