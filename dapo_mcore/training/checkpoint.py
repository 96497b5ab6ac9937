"""Training checkpoints with megatron ``dist_checkpointing`` (torch_dist format), saved atomically.

Layout: ``<dir>/iter_<step:07d>/`` (model chunks, optimizer, scheduler, trainer state) and
``<dir>/latest.json``. A save goes to ``iter_<step>.tmp`` and is renamed only after every rank finished,
then ``latest.json`` is replaced atomically, so an interrupted save never shadows the previous one.

The distributed optimizer is saved in megatron's ``fully_reshardable`` format (the default format fails on
megatron-core 0.16; this one holds one tensor per param in model space, so it reshards across TP/PP/DP and
DDP bucket layouts) through three workarounds of megatron-core 0.16 bugs: several DDP buckets per grad
buffer (:func:`fix_bucket_padding_offsets`) and the torch-Adam fallback (:func:`prepare_adam_state_for_load`,
:func:`unshare_adam_steps`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dapo_mcore.training.trainer import MegatronTrainer


class CheckpointNotFound(FileNotFoundError):
    pass


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


# The distributed optimizer's default sharding ("dp_reshardable") fails to save on megatron-core 0.16
# ("flattened_range is not supported"); "fully_reshardable" works and reshards across TP/PP/DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _torch_adam_optimizers(trainer: MegatronTrainer) -> list:
    """The megatron optimizers of ``trainer`` whose inner optimizer is torch's Adam/AdamW: the fallback
    megatron uses without Apex or Transformer Engine (whatever the device)."""
    opts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return [o for o in opts if isinstance(getattr(o, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))]


def prepare_adam_state_for_load(trainer: MegatronTrainer) -> None:
    """Workarounds (megatron-core 0.16, torch Adam fallback, every device) for loading a distributed
    optimizer from a ``fully_reshardable`` checkpoint:

    1. into a **fresh** optimizer: ``DistributedOptimizer.state_dict()`` (called while building the sharded
       state dict to load into) reads ``s["step"]`` of every param state and asserts ``len(steps) == 1``;
       a fresh optimizer has no state (the assert fails) and ``init_state_fn`` creates states without
       ``step`` (KeyError 'step'). Fix: give every param a zero state with its own ``step`` tensor (the
       load overwrites all of it).
    2. ``_set_main_param_and_optimizer_states`` copies every key of the param's optimizer state from the
       checkpoint's tensors, which have ``param``/``exp_avg``/``exp_avg_sq`` but not torch Adam's ``step``
       (KeyError 'step'; the step is restored from the param groups instead). Fix: an instance wrapper that
       hands it the state's own ``step``, a copy onto itself.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for o in _torch_adam_optimizers(trainer):
        if not isinstance(o, DistributedOptimizer):
            continue
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                st = o.optimizer.state[p]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                              exp_avg_sq=torch.zeros_like(p.data))
        if getattr(o, "_dapo_step_safe_set", False):
            continue
        orig = o._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _o=o, _orig=orig):
            gi, go = _o.model_param_group_index_map[model_param]
            st = _o.optimizer.state[_o.optimizer.param_groups[gi]["params"][go]]
            if "step" in st and "step" not in tensors:
                tensors = {**tensors, "step": st["step"]}
            return _orig(model_param, tensors)

        o._set_main_param_and_optimizer_states = set_states
        o._dapo_step_safe_set = True


def unshare_adam_steps(trainer: MegatronTrainer) -> int:
    """Workaround (megatron-core 0.16, torch Adam fallback, every device): after a load,
    ``DistributedOptimizer.load_state_dict`` assigns **one** ``step`` tensor to every param's state
    (``s["step"] = step``), and torch Adam increments ``state["step"]`` in place once per param, so after
    one more optimizer step the shared counter has advanced by the number of params and Adam's bias
    correction is wrong from then on (silently: the loss still goes down). Give each state its own copy.
    Returns how many states shared a step tensor with another (0 when nothing needed fixing)."""
    shared = 0
    for o in _torch_adam_optimizers(trainer):
        seen: set[int] = set()
        for st in o.optimizer.state.values():
            t = st.get("step")
            if torch.is_tensor(t):
                if id(t) in seen:
                    shared += 1
                    st["step"] = t.detach().clone()
                seen.add(id(t))
    return shared


def _distributed_optimizers(trainer: MegatronTrainer) -> list:
    """The megatron ``DistributedOptimizer`` s of ``trainer`` that own grad buffers (no stubs, no FSDP)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return [o for o in opts if isinstance(o, DistributedOptimizer) and not o.is_stub_optimizer
            and hasattr(o, "buffers")]


def gathered_param_index_map(buffer) -> dict:
    """``buffer.param_index_map`` (param -> (start, end, bucket_id) in the padded grad buffer) moved to the
    coordinates of the tensors ``DistributedOptimizer.get_parameter_state_dp_zero`` gathers: the buckets
    concatenated without the padding at the end of each (bucket ``b`` keeps its first ``numel_unpadded``
    elements, which include the 64-element alignment padding between its params). A param of bucket ``b``
    at padded ``start`` is there at ``start - bucket.offset + sum(numel_unpadded of buckets < b)``. With one
    bucket (offset 0) this is ``param_index_map`` itself."""
    base, acc = [], 0
    for b in buffer.buckets:
        base.append(acc - b.offset)
        acc += b.numel_unpadded
    assert acc == buffer.numel_unpadded, (acc, buffer.numel_unpadded)
    return {p: (s + base[i], e + base[i], i) for p, (s, e, i) in buffer.param_index_map.items()}


def fix_bucket_padding_offsets(trainer: MegatronTrainer) -> None:
    """Workaround (megatron-core 0.16, distributed optimizer, every device) for ``fully_reshardable``
    checkpoints of grad buffers split into several DDP buckets.

    ``sharded_param_state_fully_reshardable`` gets the world state from ``get_parameter_state_dp_zero``,
    which concatenates the buckets **without** the padding at the end of each (``bucket.numel_unpadded``
    elements per bucket), then slices every param at its offset in the **padded** grad buffer
    (``buffer.param_index_map``). Every bucket after the first is read shifted by the padding of the
    buckets before it: the saved ``param``/``exp_avg``/``exp_avg_sq`` belong partly to other params (and
    params near the end are zero-padded, with megatron's "data corruption" warning). Measured before the fix:
    resume after 2 of 4 steps with 18 buckets, params off by 1.066 (max abs). The load path
    (``load_parameter_state_from_fully_reshardable``) only uses the model-space tensors and each param's own
    range, so it is right; its ``is_loading`` placeholders (the same slicing of zero tensors) only need the
    right shapes, which the zero-padding gives them. The wrapper applies there too (the same call), where it
    only silences megatron's misleading warnings.

    Fix: an instance wrapper of ``sharded_param_state_fully_reshardable`` that, for the duration of the call,
    gives each grad buffer the ``param_index_map`` of the gathered tensors (:func:`gathered_param_index_map`;
    same params, same order, so the load's ``param_idx`` order is unchanged) and restores the original after.
    Nothing else reads ``param_index_map`` during that call. With one bucket per buffer it changes nothing.
    The checkpoint holds one tensor per param in model space, so it loads into any bucket layout."""
    for o in _distributed_optimizers(trainer):
        if getattr(o, "_dapo_bucket_offsets_fixed", False):
            continue
        orig = o.sharded_param_state_fully_reshardable

        def sharded(model_sharded_state_dict, is_loading=False, metadata=None, _o=o, _orig=orig):
            saved = [b.param_index_map for b in _o.buffers]
            try:
                for b in _o.buffers:
                    b.param_index_map = gathered_param_index_map(b)
                return _orig(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)
            finally:
                for b, m in zip(_o.buffers, saved):
                    b.param_index_map = m

        o.sharded_param_state_fully_reshardable = sharded
        o._dapo_bucket_offsets_fixed = True


def _sharded_state_dict(trainer: MegatronTrainer, is_loading: bool) -> dict:
    fix_bucket_padding_offsets(trainer)
    n = len(trainer.chunks)
    sd: dict = {}
    for i, c in enumerate(trainer.chunks):
        sd[_model_key(i, n)] = c.module.sharded_state_dict()  # unwrapped: no DDP "module." prefix
    model_sd = {k: v for k, v in sd.items()}
    sd["optimizer"] = trainer.optimizer.sharded_state_dict(
        model_sd if n > 1 else model_sd["model"], is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return sd


def save_checkpoint(trainer: MegatronTrainer, ckpt_dir: str | Path, extra: Optional[dict] = None) -> Path:
    """Save model, optimizer, scheduler and ``extra`` (JSON-able trainer state) at ``trainer.step``."""
    from megatron.core import dist_checkpointing

    trainer.sync_params()
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
    prepare_adam_state_for_load(trainer)
    sd = _sharded_state_dict(trainer, is_loading=True)
    sd["scheduler"] = trainer.scheduler.state_dict()
    sd["trainer"] = {"step": 0, "extra": ""}
    loaded = dist_checkpointing.load(sd, str(path))
    n = len(trainer.chunks)
    for i, c in enumerate(trainer.chunks):
        c.module.load_state_dict(loaded[_model_key(i, n)])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    unshare_adam_steps(trainer)
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    trainer.step = int(loaded["trainer"]["step"])
    return json.loads(loaded["trainer"]["extra"] or "{}")
