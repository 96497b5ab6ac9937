"""Supervised fine-tuning (next-token cross-entropy on the completion tokens) with the megatron trainer.

Used to build the demo's reference policy and by the rejection-sampling fine-tuning (RFT) control. The
loss reads log-probs through the fused op (no [tokens x vocab] logits), examples are FFD-packed into
block-diagonal rows, and the loss is the exact per-token mean over the global batch.

Data: a JSONL of ``{"prompt": str, "completion": str}`` rows (the completion gets EOS appended), or
token-level pairs via :func:`run_sft_examples`. ``python -m dapo_mcore.sft.train --help``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence


from dapo_mcore.packing import RowBuilder, batch_rows, dp_share, first_fit_decreasing
from dapo_mcore.parallel.runtime import ParallelConfig, add_parallel_args, parallel_from_args


@dataclass
class SFTConfig:
    init_path: str = ""
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "cosine"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta2: float = 0.95
    epochs: int = 1
    global_batch: int = 64           # examples per step
    token_budget: int = 2048         # tokens per packed row
    rows_per_microbatch: int = 1     # packed rows stacked per micro-batch
    seed: int = 0
    save_interval: int = 0
    max_steps: int = 0
    show_progress: bool = True
    tensorboard: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)   # layout + fast_paths


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
    from dapo_mcore.actor.batching import token_logp
    from dapo_mcore.training.trainer import make_loss_fn

    hidden = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], output="hidden",
                   packed_seq_params=batch.get("packed_seq_params"))

    def compute(h):
        if batch["tgt"].numel() == 0:
            return h.sum() * 0.0, 0, {}
        lp = token_logp(model, h, batch)
        return -lp.sum(), int(lp.numel()), {}

    return hidden, make_loss_fn(compute)


def encode_jsonl(path: str | Path, tok) -> list[SFTExample]:
    """Rows ``{"prompt", "completion"}``; errors name the file and line."""
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, completion = row["prompt"], row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{ln}: bad SFT row ({e}); need {{\"prompt\": str, \"completion\": str}}") from None
            out.append(SFTExample(tok.encode(prompt, add_special_tokens=False),
                                  tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]))
    return out


def run_sft_examples(cfg: SFTConfig, examples: Sequence[SFTExample], out_dir: str | Path) -> dict:
    """Train (or resume) on token-level examples; exports ``out_dir/hf``; returns the summary."""
    from transformers import AutoTokenizer

    from dapo_mcore.models.convert import save_hf_checkpoint
    from dapo_mcore.models.gpt import model_packing
    from dapo_mcore.parallel.runtime import initialize_parallel
    from dapo_mcore.training.loop import (LoopConfig, epoch_batches, load_chunks, make_trainer, pad_token_id,
                                          read_metrics, resume, run_loop, write_summary)

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
    loop = LoopConfig("sft", len(steps), cfg.save_interval, cfg.max_steps, cfg.show_progress, cfg.tensorboard)
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
    write_summary(out, summary)
    return summary


def rft_examples(gen_dir: str | Path, min_reward: float = 1.0) -> tuple[list[SFTExample], dict]:
    """Rejection-sampling fine-tuning data: the verified-correct samples of a ``generate`` output, one
    example per distinct (problem, solution) pair (the sample's ``output_ids`` end with EOS)."""
    from dapo_mcore.data.shards import iter_records

    exs, seen, n_samples, n_correct = [], set(), 0, 0
    for rec in iter_records(gen_dir):
        for s in rec["solutions"]:
            n_samples += 1
            if float(s["reward"]) < min_reward:
                continue
            n_correct += 1
            key = (rec["problem_id"], tuple(s["output_ids"]))
            if key in seen:
                continue
            seen.add(key)
            exs.append(SFTExample(list(rec["prompt_ids"]), list(s["output_ids"])))
    return exs, {"samples": n_samples, "correct": n_correct, "distinct_correct": len(exs)}


def run_rft(cfg: SFTConfig, gen_dir: str | Path, out_dir: str | Path) -> dict:
    """The rejection-sampling fine-tuning control: SFT of ``cfg.init_path`` on its own verified-correct
    samples from ``gen_dir`` (a ``generate`` output); returns the SFT summary plus the data counts."""
    exs, counts = rft_examples(gen_dir)
    if not exs:
        # fine-tuning on nothing leaves the reference unchanged: export it as the control's policy
        import shutil

        import torch.distributed as dist

        from dapo_mcore.parallel.runtime import initialize_parallel

        initialize_parallel(cfg.parallel)
        summary = {"stage": "rft", "rft": counts, "trained": False,
                   "note": "no verified-correct samples: the RFT policy is the reference"}
        if dist.get_rank() == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out / "hf", ignore_errors=True)
            shutil.copytree(cfg.init_path, out / "hf")
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        dist.barrier()
        return summary
    summary = run_sft_examples(cfg, exs, out_dir)
    summary["rft"] = counts
    summary["trained"] = True
    if not summary.get("partial"):
        from dapo_mcore.training.loop import write_summary

        write_summary(Path(out_dir), summary)
    return summary


def run_sft(cfg: SFTConfig, data: str | Path, out_dir: str | Path) -> dict:
    from transformers import AutoTokenizer

    if not cfg.init_path:
        raise ValueError("sft.init_path is required")
    return run_sft_examples(cfg, encode_jsonl(data, AutoTokenizer.from_pretrained(cfg.init_path)), out_dir)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Supervised fine-tuning (megatron, fused log-probs, packed rows).")
    ap.add_argument("--data", required=True, help='JSONL of {"prompt": ..., "completion": ...}')
    ap.add_argument("--init", required=True, help="HF checkpoint to start from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--token-budget", type=int, default=2048)
    add_parallel_args(ap)   # also --global-batch (examples), --micro-batch (rows), fast-path flags
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0)
    a = ap.parse_args(argv)
    d = SFTConfig()
    cfg = SFTConfig(init_path=a.init, lr=a.lr, epochs=a.epochs, global_batch=a.global_batch or d.global_batch,
                    token_budget=a.token_budget, rows_per_microbatch=a.micro_batch or d.rows_per_microbatch,
                    seed=a.seed, max_steps=a.max_steps,
                    parallel=parallel_from_args(a))
    run_sft(cfg, a.data, a.out)


if __name__ == "__main__":
    from dapo_mcore.parallel.runtime import process_group_scope

    with process_group_scope():
        main()
