"""Supervised fine-tuning (next-token cross-entropy on the completion tokens) with the megatron trainer.

Used to build the demo's reference policy and by the rejection-sampling fine-tuning (RFT) control. The
loss reads log-probs through the fused op (no [tokens x vocab] logits), examples are FFD-packed into
block-diagonal rows, and the loss is the exact per-token mean over the global batch.

Data: token-level (prompt, completion) pairs (:class:`SFTExample`) given to :func:`run_sft_examples`. The RFT control (:mod:`dapo_mcore.sft.rft`) runs it as a
pipeline stage (section ``rft``); the CPU demo builds its reference policy with it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from dapo_mcore.config import option
from dapo_mcore.models.convert import save_hf_checkpoint
from dapo_mcore.models.gpt import model_packing
from dapo_mcore.packing import RowBuilder, batch_rows, dp_share, first_fit_decreasing
from dapo_mcore.parallel.runtime import initialize_parallel
from dapo_mcore.training.config import TrainingConfig
from dapo_mcore.training.logprobs import token_logp
from dapo_mcore.training.loop import (epoch_batches, load_chunks, make_trainer, pad_token_id, read_metrics, resume,
                                      run_loop, save_summary)
from dapo_mcore.training.trainer import DECAY_STYLES, make_loss_fn


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning (the ``rft`` section of a run)."""

    lr: float = option(1e-3, "peak learning rate", gt=0)
    decay_style: str = option("cosine", "decay after warm-up: constant | linear | cosine", choices=DECAY_STYLES)
    token_budget: int = option(2048, "tokens per packed row", ge=1)
    global_batch: int = option(64, "examples per optimizer step", flag="--global-batch", ge=1)


@dataclass
class SFTExample:
    prompt: list[int]
    completion: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def pack_sft(examples: Sequence[SFTExample], token_budget: int, pad_id: int, rows_per_microbatch: int = 1,
             packing: str = "dense_mask") -> list[dict]:
    """FFD-packed rows; per micro-batch the gather indices ``src`` (predicting positions, flat) and ``tgt``
    (completion tokens), like the actor's, so the fused log-prob op reads only the labelled positions.
    ``packing``: ``"dense_mask"`` (``[b, L]`` + mask) or ``"thd"`` (``[1, T]``, no padding; see
    :func:`dapo_mcore.packing.batch_rows`)."""
    rows = []
    for b in first_fit_decreasing([len(e) for e in examples], token_budget):
        rb = RowBuilder()
        src, tgt = [], []
        for i in b:
            e = examples[i]
            span = rb.add_example(e.prompt + e.completion)
            first = span.start + len(e.prompt)
            src += list(range(first - 1, span.end - 1))
            tgt += e.completion
        rows.append((rb.build(), {"src": src, "tgt": tgt}))
    return batch_rows(rows, rows_per_microbatch, pad_id, packing)


def sft_forward_step(model, batch: dict):
    """loss = −Σ log p(completion tokens), count = #completion tokens."""
    hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden",
                   packed_seq_params=batch.get("packed_seq_params"))

    def compute(h):
        if batch["tgt"].numel() == 0:
            return h.sum() * 0.0, 0, {}
        lp = token_logp(model, h, batch)
        return -lp.sum(), int(lp.numel()), {}

    return hidden, make_loss_fn(compute)


def run_sft_examples(cfg: SFTConfig, examples: Sequence[SFTExample], out_dir: str | Path) -> dict:
    """Train (or resume) on token-level examples; exports ``out_dir/hf``; returns the summary."""
    from transformers import AutoTokenizer

    if not cfg.init_path:
        raise ValueError("sft.init_path is required")
    if not examples:
        raise ValueError("no SFT examples")
    out = Path(out_dir)
    t0 = time.time()
    initialize_parallel(cfg.parallel)
    pad_id = pad_token_id(AutoTokenizer.from_pretrained(cfg.init_path))
    arch, chunks = load_chunks(cfg.init_path, cfg.parallel)
    steps = epoch_batches(len(examples), cfg.global_batch, cfg.epochs, cfg.seed)
    trainer = make_trainer(chunks, cfg, total_steps=len(steps))
    resume(trainer, out / "checkpoints")
    loop = cfg.loop("sft", len(steps))
    packing = model_packing(trainer.chunks)          # "thd" | "dense_mask", from the fast-path switch
    finished = run_loop(trainer, loop, out,
                        lambda i: dp_share(pack_sft([examples[j] for j in steps[i]], cfg.token_budget, pad_id,
                                                     cfg.rows_per_microbatch, packing), pad_id),
                        sft_forward_step,
                        lambda r: {"loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr, "tokens": r.count})
    if not finished:
        return {"stage": "sft", "partial": True, "steps": trainer.step, "total_steps": len(steps)}
    save_hf_checkpoint(trainer.chunks, out / "hf", arch, source_dir=cfg.init_path)
    hist = read_metrics(out)
    summary = {"stage": "sft", "examples": len(examples), "steps": trainer.step, "seconds": time.time() - t0,
               "first": hist[0] if hist else None, "last": hist[-1] if hist else None,
               "config": json.loads(json.dumps(asdict(cfg), default=str)),
               "paths": trainer.paths.as_dict()}
    save_summary(out, summary)
    return summary
