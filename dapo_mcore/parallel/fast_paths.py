"""GPU fast paths behind one switch, each with the CPU path it replaces.

``FastPathConfig.mode`` is the switch:

* ``"auto"``: the GPU paths when CUDA is present, else the portable CPU paths (fp32, no recompute, plain
  optimizer, synchronous reduce, dense masks: the fast way to run the demo on a laptop);
* ``"gpu"``: require the GPU paths (an error on a machine without CUDA);
* ``"cpu"``: the portable paths everywhere;
* ``"emulate"``: the megatron features of the GPU configuration, run where megatron can run them, i.e. also
  on a CPU: bf16 params with fp32 main params (``bf16``), activation recompute, the distributed optimizer,
  overlapped grad reduce / param gather, THD packing (through the CPU varlen core attention), with the
  local layer spec and dense shared-prefix masks (flex_attention has no CPU backward). Purpose: check a
  GPU job's configuration end to end on a laptop with a tiny model before the cluster run, and test each
  path against the CPU path it replaces.

:func:`resolve` turns the switch and the layout into one :class:`ResolvedPaths` per run (the single
source of truth for the model build, :func:`dapo_mcore.models.hf_config.transformer_config`, and
:class:`dapo_mcore.training.trainer.MegatronTrainer`) and validates the combination before any model
is built. Sequence parallelism is a layout setting (``ParallelConfig.sequence_parallel``), passed in.

| fast path (GPU)                         | CPU path it replaces                          | tested on CPU (emulate) against          |
|-----------------------------------------|-----------------------------------------------|------------------------------------------|
| Transformer Engine layer spec           | megatron local spec                           | (GPU only; local spec vs HF logits)      |
| THD packed sequences (PackedSeqParams)  | block-diagonal dense mask                     | unpacked runs (CPU varlen attention)     |
|   critic training, SFT only: shared-    |                                               |   ThdCoreAttention == dense mask == alone,|
|   prefix rows (actor, ref log-probs,    |                                               |   TP=2 == TP=1 (tests/test_thd.py)       |
|   critic scoring) cannot be THD and     |                                               |                                          |
|   keep the dense mask / flex            |                                               |                                          |
| shared-prefix attention: flex_attention | dense boolean mask (megatron local attention) | dense-mask logits (forward only on CPU)  |
|   with a block mask from doc/part ids   |                                               |                                          |
| sequence parallel                       | off (needs TE LayerNorm)                      | (GPU only; refused on CPU)               |
| bf16 + fp32 main params                 | fp32                                          | fp32 within tolerance; main params fp32, |
|                                         |                                               | updates below bf16 resolution accumulate |
| activation recompute (full, selective)  | off                                           | loss and every gradient, TP=1 and TP=2   |
| distributed optimizer                   | megatron non-distributed optimizer            | params after 3 steps, DP=2; checkpoint   |
|                                         |                                               | resume == uninterrupted run              |
| overlap grad reduce / param gather      | synchronous reduce                            | grads and params after steps, DP=2       |

This module only chooses: the attention modules the choice plugs in live in :mod:`dapo_mcore.models.attention`,
the THD pack metadata in :mod:`dapo_mcore.packing`.

Tests: ``tests/test_fast_paths.py`` (selection, validation, THD ``cu_seqlens``, the flex mask and kernel
forward) and ``tests/test_train_fast_paths.py`` (every emulated path in ``MegatronTrainer`` under torchrun).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from dapo_mcore.config import option

MODES = ("auto", "gpu", "cpu", "emulate")
RECOMPUTE = ("none", "full", "selective")


class FastPathError(ValueError):
    """An impossible fast-path combination (named in the message)."""


@dataclass
class FastPathConfig:
    """What a run asks for; :func:`resolve` decides what it gets on this machine (see the module doc)."""

    mode: str = option("auto", "auto (GPU paths with CUDA, else portable) | gpu | cpu | emulate (the GPU "
                               "configuration's megatron features on this machine)")
    bf16: bool = option(True, "bf16 params with fp32 main params")
    recompute: str = option("none", "activation recompute: none | full (every layer) | selective (core attention)",
                            flag="--recompute")
    distributed_optimizer: bool = option(True, "shard optimizer states over data-parallel ranks")
    overlap_grad_reduce: bool = option(True, "overlap the gradient reduce with the backward pass")
    overlap_param_gather: bool = option(True, "overlap the param all-gather with the forward pass (distributed "
                                              "optimizer only)")
    thd_packing: bool = option(True, "THD packed sequences for example rows (critic training, SFT)")
    shared_prefix_attention: str = option("flex", "shared-prefix rows: flex (flex_attention block mask) | dense")


@dataclass(frozen=True)
class ResolvedPaths:
    """What a run will use (every field is the path actually taken)."""

    gpu: bool
    layer_spec: str                 # "transformer_engine" | "local"
    packing: str                    # "thd" | "dense_mask"
    shared_prefix_attention: str    # "flex" | "dense_mask"
    sequence_parallel: bool
    params_dtype: str               # "bfloat16" | "float32"
    recompute: str                  # "none" | "full" | "selective"
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.params_dtype)

    @property
    def bf16(self) -> bool:
        return self.params_dtype == "bfloat16"

    def as_dict(self) -> dict:
        return asdict(self)


PORTABLE = ResolvedPaths(gpu=False, layer_spec="local", packing="dense_mask", shared_prefix_attention="dense_mask",
                         sequence_parallel=False, params_dtype="float32", recompute="none",
                         distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False)
"""The portable CPU paths (``mode="cpu"``, or ``"auto"`` without CUDA)."""


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except ImportError:
        return False


def resolve(cfg: FastPathConfig, tp: int, sequence_parallel: bool = False, cuda: Optional[bool] = None,
            te: Optional[bool] = None) -> ResolvedPaths:
    """Choose every path for this machine and layout; raise :class:`FastPathError` naming what is wrong."""
    if cfg.mode not in MODES:
        raise FastPathError(f"fast_paths.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.shared_prefix_attention not in ("flex", "dense"):
        raise FastPathError(f"fast_paths.shared_prefix_attention must be 'flex' or 'dense', "
                            f"got {cfg.shared_prefix_attention!r}")
    if cfg.recompute not in RECOMPUTE:
        raise FastPathError(f"fast_paths.recompute must be one of {RECOMPUTE}, got {cfg.recompute!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = _have_te() if te is None else te
    if cfg.mode == "gpu" and not cuda:
        raise FastPathError("fast_paths.mode='gpu' but CUDA is not available on this machine "
                            "(use 'auto', 'cpu' or 'emulate')")
    if sequence_parallel and tp < 2:
        raise FastPathError("sequence_parallel requires tensor_model_parallel_size > 1")
    gpu = cuda and cfg.mode in ("auto", "gpu")
    if gpu or cfg.mode == "emulate":
        if cfg.overlap_param_gather and not cfg.distributed_optimizer:
            raise FastPathError("overlap_param_gather requires distributed_optimizer")
    # the megatron features, taken as asked on a GPU and in emulate mode
    features = dict(params_dtype="bfloat16" if cfg.bf16 else "float32", recompute=cfg.recompute,
                    distributed_optimizer=cfg.distributed_optimizer, overlap_grad_reduce=cfg.overlap_grad_reduce,
                    overlap_param_gather=cfg.overlap_param_gather)
    if gpu:
        if sequence_parallel and not te:
            raise FastPathError("sequence_parallel needs the Transformer Engine layer spec (install transformer-engine)")
        return ResolvedPaths(
            gpu=True, layer_spec="transformer_engine" if te else "local",
            packing="thd" if (cfg.thd_packing and te) else "dense_mask",
            shared_prefix_attention="flex" if cfg.shared_prefix_attention == "flex" else "dense_mask",
            sequence_parallel=sequence_parallel, **features)
    if sequence_parallel:
        raise FastPathError("sequence_parallel is a GPU path (the CPU local spec's LayerNorm does not support it)")
    if cfg.mode == "emulate":
        return ResolvedPaths(gpu=False, layer_spec="local", packing="thd" if cfg.thd_packing else "dense_mask",
                             shared_prefix_attention="dense_mask", sequence_parallel=False, **features)
    return PORTABLE
