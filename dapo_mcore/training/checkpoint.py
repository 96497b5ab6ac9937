"""Training checkpoints with megatron ``dist_checkpointing`` (torch_dist format), saved atomically.

Layout: ``<dir>/iter_<step:07d>/`` (model chunks, optimizer, scheduler, trainer state) and
``<dir>/latest.json``. A save goes to ``iter_<step>.tmp`` and is renamed only after every rank finished,
then ``latest.json`` is replaced atomically, so an interrupted save never shadows the previous one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dapo_mcore.training.trainer import MegatronTrainer


class CheckpointNotFound(FileNotFoundError):
    pass


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _sharded_state_dict(trainer: MegatronTrainer, is_loading: bool) -> dict:
    n = len(trainer.chunks)
    sd: dict = {}
    for i, c in enumerate(trainer.chunks):
        sd[_model_key(i, n)] = c.module.sharded_state_dict()  # unwrapped: no DDP "module." prefix
    model_sd = {k: v for k, v in sd.items()}
    sd["optimizer"] = trainer.optimizer.sharded_state_dict(
        model_sd if n > 1 else model_sd["model"], is_loading=is_loading)
    return sd


def save_checkpoint(trainer: MegatronTrainer, ckpt_dir: str | Path, extra: Optional[dict] = None) -> Path:
    """Save model, optimizer, scheduler and ``extra`` (JSON-able trainer state) at ``trainer.step``."""
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    final = root / f"iter_{trainer.step:07d}"
    tmp = root / f"iter_{trainer.step:07d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state_dict(trainer, is_loading=False)
    sd["scheduler"] = trainer.scheduler.state_dict()
    sd["trainer"] = {"step": trainer.step, "extra": json.dumps(extra or {})}
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.json.tmp"
        latest_tmp.write_text(json.dumps({"step": trainer.step, "path": final.name}))
        os.replace(latest_tmp, root / "latest.json")
    dist.barrier()
    return final


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    """The directory named by ``latest.json``, or None if there is no finished checkpoint."""
    f = Path(ckpt_dir) / "latest.json"
    if not f.is_file():
        return None
    try:
        path = Path(ckpt_dir) / json.loads(f.read_text())["path"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointNotFound(f"{f}: corrupt ({e})") from None
    if not path.is_dir():
        raise CheckpointNotFound(f"{f} names {path}, which does not exist")
    return path


def load_checkpoint(trainer: MegatronTrainer, path: str | Path) -> dict:
    """Restore model, optimizer, scheduler and step from ``path``; returns the saved ``extra`` dict."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise CheckpointNotFound(f"{path}: not a dist_checkpointing checkpoint (no metadata.json)")
    sd = _sharded_state_dict(trainer, is_loading=True)
    sd["scheduler"] = trainer.scheduler.state_dict()
    sd["trainer"] = {"step": 0, "extra": ""}
    loaded = dist_checkpointing.load(sd, str(path))
    n = len(trainer.chunks)
    for i, c in enumerate(trainer.chunks):
        c.module.load_state_dict(loaded[_model_key(i, n)])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    trainer.step = int(loaded["trainer"]["step"])
    return json.loads(loaded["trainer"]["extra"] or "{}")
