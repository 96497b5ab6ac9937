"""Stage 3 — critic: train V_phi (transformer + scalar head + sigmoid) with BCE on soft MC targets.

Runs on every rank (in the pipeline's process, or under ``torchrun``): ``dapo-mcore train-critic CONFIG``
(section ``critic``; ``--help`` lists the keys). Outputs in ``out_dir``: ``checkpoints/`` (megatron dist checkpoints, resumable), ``hf/`` (the value model
as an HF ``ForTokenClassification`` checkpoint), ``calibration.png``, ``tb/`` (TensorBoard),
``metrics.jsonl`` (one line per step) and ``summary.json`` (written last: the stage is finished).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dapo_mcore.config import option
from dapo_mcore.critic.data import (CriticExample, completion_examples, pack_examples, read_mc, solution_examples,
                                    split_by_problem, truncate)
from dapo_mcore.critic.metrics import calibration_plot, critic_metrics
from dapo_mcore.models.convert import save_hf_checkpoint
from dapo_mcore.models.gpt import model_packing
from dapo_mcore.models.hf_config import load_arch
from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.runtime import initialize_parallel
from dapo_mcore.training.config import TrainingConfig
from dapo_mcore.training.loop import (epoch_batches, load_chunks, make_trainer, pad_token_id, resume, run_loop,
                                      save_summary, tensorboard_scalars)
from dapo_mcore.training.trainer import make_loss_fn
from dapo_mcore.training.values import values_by_example


@dataclass
class CriticConfig(TrainingConfig):
    """Stage 3 (train-critic). Paper: 1 epoch, lr 5e-6, global batch 512 examples."""

    lr: float = option(5e-6, "peak learning rate")
    decay_style: str = option("cosine", "decay after warm-up: constant | linear | cosine")
    global_batch: int = option(512, "examples per optimizer step", flag="--global-batch")
    max_length: Optional[int] = option(None, "tokens per example at most (default: the model's "
                                             "max_position_embeddings)")
    use_completions: bool = option(False, "also train on MC completions, labelled with their single-sample outcome")
    heldout_fraction: float = option(0.1, "fraction of problems held out for the calibration metrics")


def value_forward_step(model, batch: dict):
    """Value logits at the labelled positions; loss = BCE-with-logits sum, count = #labels."""
    out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                packed_seq_params=batch.get("packed_seq_params"))

    def compute(o):
        logit = o.float().reshape(-1)[batch["label_index"]]
        tgt = batch["targets"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, tgt, reduction="sum")
        p = torch.sigmoid(logit.detach())
        return loss, int(tgt.numel()), {"sq_err": ((p - tgt) ** 2).sum()}

    return out, make_loss_fn(compute)


def predict(chunks: list, examples: list[CriticExample], token_budget: int, pad_id: int,
            rows_per_microbatch: int = 1) -> list[float]:
    """V at every label of ``examples`` (in order), through the pipeline; the same list on every rank.
    Batches in the layout the chunks were built for (THD or dense mask: ``model_packing``)."""
    if not examples:
        return []
    mbs = pack_examples(examples, token_budget, pad_id, rows_per_microbatch, model_packing(chunks))
    vals = values_by_example(chunks, mbs, [len(e.label_pos) for e in examples], pad_id)
    return [v for per in vals for v in per]


def _build_examples(cfg: CriticConfig, mc_dir: str | Path, tok, max_len: int) -> tuple[list, list, dict]:
    records = read_mc(mc_dir)
    exs = solution_examples(records)
    n_sol = len(exs)
    if cfg.use_completions:
        delim_ids = tok.encode("\n", add_special_tokens=False)
        exs += completion_examples(records, delim_ids, tok.eos_token_id)
    kept = [e for e in (truncate(e, max_len) for e in exs) if e is not None]
    train, val = split_by_problem(kept, cfg.heldout_fraction, cfg.seed)
    val = [e for e in val if e.kind == "solution"]   # evaluate on MC-labelled states only
    counts = {"mc_states": len(records), "solution_examples": n_sol, "completion_examples": len(exs) - n_sol,
              "dropped_too_long": len(exs) - len(kept), "train_examples": len(train), "val_examples": len(val),
              "train_labels": sum(len(e.targets) for e in train), "val_labels": sum(len(e.targets) for e in val)}
    return train, val, counts


def run_train_critic(cfg: CriticConfig, mc_dir: str | Path, out_dir: str | Path) -> dict:
    """Train (or resume) the critic on a finished ``mc`` output; returns the summary (every rank)."""
    from transformers import AutoTokenizer

    if not cfg.init_path:
        raise ValueError("critic.init_path is required (an HF checkpoint to initialise the critic from)")
    out = Path(out_dir)
    t0 = time.time()
    initialize_parallel(cfg.parallel)
    rank0 = dist.get_rank() == 0
    arch = load_arch(cfg.init_path)
    tok = AutoTokenizer.from_pretrained(cfg.init_path)
    pad_id = pad_token_id(tok)
    max_len = min(cfg.max_length or arch.max_position_embeddings, cfg.token_budget)
    train, val, counts = _build_examples(cfg, mc_dir, tok, max_len)
    if not train:
        raise ValueError(f"{mc_dir}: no training examples for the critic (all problems held out or no states)")
    train_mean = sum(t for e in train for t in e.targets) / max(1, sum(len(e.targets) for e in train))

    _, chunks = load_chunks(cfg.init_path, cfg.parallel, value_head=True, value_head_seed=cfg.seed)
    steps = epoch_batches(len(train), cfg.global_batch, cfg.epochs, cfg.seed)
    trainer = make_trainer(chunks, cfg, total_steps=len(steps))
    resume(trainer, out / "checkpoints")
    loop = cfg.loop("critic", len(steps))
    packing = model_packing(trainer.chunks)          # "thd" | "dense_mask", from the fast-path switch
    finished = run_loop(
        trainer, loop, out,
        lambda i: dp_share(pack_examples([train[j] for j in steps[i]], cfg.token_budget, pad_id,
                                         cfg.rows_per_microbatch, packing), pad_id),
        value_forward_step,
        lambda r: {"loss": r.loss, "brier": r.logs.get("sq_err", float("nan")), "grad_norm": r.grad_norm,
                   "lr": r.lr, "labels": r.count})
    if not finished:
        return {"stage": "train-critic", "partial": True, "steps": trainer.step, "total_steps": len(steps)}

    preds = predict(trainer.chunks, val, cfg.token_budget, pad_id, cfg.rows_per_microbatch)
    targets = [t for e in val for t in e.targets]
    metrics = critic_metrics(preds, targets, train_mean)
    train_preds = predict(trainer.chunks, train[:2000], cfg.token_budget, pad_id, cfg.rows_per_microbatch)
    train_metrics = critic_metrics(train_preds, [t for e in train[:2000] for t in e.targets], train_mean)
    save_hf_checkpoint(trainer.chunks, out / "hf", arch, source_dir=cfg.init_path)
    summary = {"stage": "train-critic", "counts": counts, "steps": trainer.step, "train_mean_target": train_mean,
               "heldout": metrics, "train": train_metrics, "seconds": time.time() - t0,
               "config": json.loads(json.dumps(asdict(cfg), default=str)),
               "paths": trainer.paths.as_dict()}
    if cfg.tensorboard:
        tensorboard_scalars(out, "critic_heldout", metrics, trainer.step)
    if rank0 and preds:
        calibration_plot(preds, targets, out / "calibration.png", title="held-out critic")
    save_summary(out, summary)
    if rank0:
        print(f"[critic] held-out Brier {metrics['brier']:.4f} vs constant {metrics['brier_baseline']:.4f}, "
              f"Pearson r {metrics['pearson']:.3f}, ECE {metrics['ece']:.3f} ({metrics['n']} labels)")
    return summary


def summary_note(summary: dict) -> str:
    """The critic's line in the report's stage table."""
    sec = summary.get("seconds") or 0.0
    if not sec:
        return ""
    n = summary["counts"]["train_labels"] * summary.get("config", {}).get("epochs", 1)
    return f"{summary['steps']} steps, {n / sec:.0f} labelled states/s"
