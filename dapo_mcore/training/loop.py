"""The resumable training loop shared by the training stages (critic, actor, SFT/RFT).

Per optimizer step it asks for the step's micro-batches, runs :meth:`MegatronTrainer.train_step`, appends
a line to ``metrics.jsonl`` (rank 0), logs to TensorBoard and the progress bar, and checkpoints every
``save_interval`` steps, on Ctrl-C (then re-raises) and when ``max_steps`` steps were run in this
invocation (then returns ``False``: a partial run, resumable). On resume the lines of ``metrics.jsonl``
past the checkpoint are dropped, so the file always describes exactly one run.
"""
from __future__ import annotations

import json
import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from dapo_mcore.data.shards import write_summary
from dapo_mcore.models.convert import load_hf_weights
from dapo_mcore.models.gpt import build_model_chunks
from dapo_mcore.models.hf_config import load_arch, transformer_config
from dapo_mcore.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dapo_mcore.training.trainer import ForwardStep, MegatronTrainer, StepResult


@dataclass
class LoopConfig:
    name: str                      # e.g. "critic", "actor" (progress bar, TensorBoard tags)
    total_steps: int
    save_interval: int = 0
    max_steps: int = 0
    show_progress: bool = True
    tensorboard: bool = True


def resume(trainer: MegatronTrainer, ckpt_dir: Path) -> None:
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        load_checkpoint(trainer, latest)


def run_loop(trainer: MegatronTrainer, cfg: LoopConfig, out: Path, microbatches_for: Callable[[int], list],
             forward_step: ForwardStep, record: Callable[[StepResult], dict]) -> bool:
    """Train until ``cfg.total_steps``; returns True when finished, False when stopped by ``max_steps``.

    ``microbatches_for(step_index)`` gives this rank's micro-batches of the 0-based step;
    ``record(result)`` the JSON-able metrics of a step (``step`` is added).
    """
    rank0 = dist.get_rank() == 0
    ckpt_dir = out / "checkpoints"
    start = trainer.step
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.jsonl"
    mlog = tb = bar = None
    if rank0:
        if mpath.exists():
            keep = [ln for ln in mpath.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
            mpath.write_text("".join(ln + "\n" for ln in keep))
        mlog = open(mpath, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"))
        if cfg.show_progress:
            bar = tqdm(total=cfg.total_steps, initial=start, desc=cfg.name, unit="step", mininterval=1.0)
    interrupted = {"flag": False}
    old = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True)) if rank0 else None
    try:
        while trainer.step < cfg.total_steps:
            if cfg.max_steps and trainer.step - start >= cfg.max_steps:
                save_checkpoint(trainer, ckpt_dir, extra={"stage": cfg.name})
                return False
            res = trainer.train_step(microbatches_for(trainer.step), forward_step)
            rec = {"step": trainer.step, **record(res)}
            if rank0:
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                if tb:
                    for k, v in rec.items():
                        if k != "step" and isinstance(v, (int, float)):
                            tb.add_scalar(f"{cfg.name}/{k}", v, trainer.step)
                if bar:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "grad_norm")})
            flag = torch.tensor([1 if interrupted["flag"] else 0])
            dist.all_reduce(flag)
            if flag.item() or (cfg.save_interval and trainer.step % cfg.save_interval == 0):
                save_checkpoint(trainer, ckpt_dir, extra={"stage": cfg.name})
            if flag.item():
                raise KeyboardInterrupt(f"{cfg.name} training interrupted at step {trainer.step}; checkpoint saved")
    finally:
        for h in (mlog, tb, bar):
            if h is not None:
                h.close()
        if old is not None:
            signal.signal(signal.SIGINT, old)
    latest = latest_checkpoint(ckpt_dir)
    if latest is None or json.loads((ckpt_dir / "latest.json").read_text())["step"] != trainer.step:
        save_checkpoint(trainer, ckpt_dir, extra={"stage": cfg.name})
    trainer.sync_params()   # the caller exports/evaluates the params next
    return True


def read_metrics(out: Path) -> list[dict]:
    p = Path(out) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x] if p.exists() else []


def tensorboard_scalars(out: Path, name: str, values: dict, step: int) -> None:
    """Write final scalars (e.g. held-out metrics) to the run's TensorBoard directory (rank 0 only)."""
    if dist.get_rank() != 0:
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(Path(out) / "tb")) as tb:
        for k, v in values.items():
            if isinstance(v, float) and math.isfinite(v):
                tb.add_scalar(f"{name}/{k}", v, step)



# ------------------------------------------------------------------------------------ stage set-up
def epoch_batches(n_items: int, global_batch: int, epochs: int, seed: int) -> list[list[int]]:
    """Item indices of every optimizer step: ``epochs`` seeded shuffles cut into ``global_batch`` pieces
    (a short last piece per epoch is kept)."""
    steps = []
    for ep in range(epochs):
        order = list(range(n_items))
        random.Random(seed * 1000 + ep).shuffle(order)
        steps += [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    return steps


def pad_token_id(tok) -> int:
    """The id used to pad packed rows (PAD, else EOS, else 0)."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id or 0)


def load_chunks(path: str, parallel, *, value_head: bool = False, value_head_seed: int = 0,
                init_value_head: bool = True):
    """``(arch, chunks)``: this rank's megatron model chunks for the layout and fast paths of ``parallel``
    (a :class:`~dapo_mcore.parallel.runtime.ParallelConfig`), loaded from the HF checkpoint ``path`` (the
    value model when ``value_head``)."""
    arch = load_arch(path)
    p = parallel
    paths = p.paths()
    chunks = build_model_chunks(arch, transformer_config(arch, tp=p.tensor_model_parallel_size,
                                                         pp=p.pipeline_model_parallel_size,
                                                         vpp=p.virtual_pipeline_model_parallel_size, paths=paths,
                                                         ep=p.expert_model_parallel_size),
                                value_head=value_head, value_head_seed=value_head_seed, paths=paths)
    if paths.bf16:
        # Every param in bf16, as megatron-lm's Float16Module does (module.bfloat16()): the local spec's torch
        # norms are created fp32 whatever params_dtype says (the TE spec's are bf16), and a model with params
        # of two dtypes breaks the distributed optimizer's fully-reshardable checkpoint save (megatron-core
        # 0.16 get_parameter_state_dp_zero: size mismatch copying the shards of the second buffer).
        for c in chunks:
            c.to(dtype=torch.bfloat16)
    load_hf_weights(chunks, path, arch, init_value_head=init_value_head)
    return arch, chunks


def make_trainer(chunks: list, cfg, total_steps: int) -> MegatronTrainer:
    """The trainer of a training stage config ``cfg`` (a :class:`~dapo_mcore.training.config.TrainingConfig`):
    its fast paths are ``cfg.parallel.paths()``, the same the chunks were built with by :func:`load_chunks`."""
    return MegatronTrainer(chunks, cfg.optim(), total_steps, paths=cfg.parallel.paths())


def save_summary(out: Path, summary: dict) -> None:
    """Rank 0 writes ``summary.json`` (:func:`dapo_mcore.data.shards.write_summary`: it marks the stage
    finished); every rank waits."""
    if dist.get_rank() == 0:
        write_summary(out, summary)
    dist.barrier()
