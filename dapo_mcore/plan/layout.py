"""The parallel layout shared by the planner, the launchers and the Megatron stages.

One set of layout flags, spelled the same everywhere (``scripts/launch_torchrun.sh``,
``scripts/slurm_dapo.sbatch``, ``dapo-mcore plan``); :func:`add_layout_args` defines them:

  --tp N  --pp N  --vpp N  --dp N  --sequence-parallel  --micro-batch N  --global-batch N
  --recompute {none,full}

DP is normally derived (``world / (TP x PP)``); ``--dp`` is a check. Batches count sequences
(packed rows of ``--seq-length`` tokens) per micro-batch and per optimizer step (all DP ranks).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from dapo_mcore.models.hf_config import ArchSpec, ModelConfigError

RECOMPUTE_CHOICES = ("none", "full")


class LayoutError(ValueError):
    """An impossible layout (names the offending flag)."""


@dataclass(frozen=True)
class Layout:
    """Parallel layout + batch shape of one Megatron stage on ``nodes x gpus_per_node`` GPUs."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    nodes: int = 1
    gpus_per_node: int = 8
    sequence_parallel: bool = False
    micro_batch: int = 1          # sequences per micro-batch
    global_batch: int = 512       # sequences per optimizer step (all DP ranks)
    seq_length: int = 4096        # tokens per sequence (packed row)
    recompute: str = "none"       # none | full (megatron: full, uniform, 1 layer per checkpoint)
    distributed_optimizer: bool = False
    bf16: bool = True             # bf16 params + fp32 grads and main params (else fp32 everywhere)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def validate(self, arch: Optional[ArchSpec] = None, dp: Optional[int] = None) -> None:
        """Raise :class:`LayoutError` for an impossible layout (``dp``: the value given with ``--dp``)."""
        for name in ("tp", "pp", "nodes", "gpus_per_node", "micro_batch", "global_batch", "seq_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.world % (self.tp * self.pp):
            raise LayoutError(f"TP x PP = {self.tp} x {self.pp} does not divide the {self.world} GPUs "
                              f"({self.nodes} nodes x {self.gpus_per_node})")
        if dp is not None and dp != self.dp:
            raise LayoutError(f"--dp {dp} != GPUs / (TP x PP) = {self.world} / {self.tp * self.pp} = {self.dp}")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise LayoutError(f"--vpp {self.vpp} needs --pp >= 2 (got {self.pp})")
        if self.sequence_parallel and self.tp < 2:
            raise LayoutError("--sequence-parallel requires --tp > 1")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise LayoutError(f"--recompute must be one of {RECOMPUTE_CHOICES}, got {self.recompute!r}")
        if self.global_batch % (self.micro_batch * self.dp):
            raise LayoutError(f"--global-batch {self.global_batch} is not a multiple of micro-batch x DP = "
                              f"{self.micro_batch} x {self.dp}")
        if arch is not None:
            try:
                arch.check_parallel(self.tp, self.pp)
            except ModelConfigError as e:
                raise LayoutError(str(e)) from None
            if self.vpp is not None and arch.num_layers % (self.pp * self.vpp):
                raise LayoutError(f"PP x VPP = {self.pp} x {self.vpp} does not divide num_layers={arch.num_layers}")
            if self.seq_length > arch.max_position_embeddings:
                raise LayoutError(f"--seq-length {self.seq_length} exceeds the model's max_position_embeddings="
                                  f"{arch.max_position_embeddings}")

    def describe(self) -> str:
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return (f"TP{self.tp} PP{self.pp}{vpp} DP{self.dp}{' SP' if self.sequence_parallel else ''}"
                f" recompute={self.recompute} dist-opt={'on' if self.distributed_optimizer else 'off'}"
                f" mb={self.micro_batch} gb={self.global_batch} seq={self.seq_length}")


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    """The shared layout flags (see the module doc); defaults ``None`` mean "not given"."""
    g = parser.add_argument_group("parallel layout (shared by every Megatron stage and launcher)")
    g.add_argument("--tp", type=_positive, default=None, help="tensor parallel size (default 1)")
    g.add_argument("--pp", type=_positive, default=None, help="pipeline parallel size (default 1)")
    g.add_argument("--vpp", type=_positive, default=None, help="virtual pipeline chunks per PP rank")
    g.add_argument("--dp", type=_positive, default=None, help="data parallel size: a check, DP = GPUs/(TP*PP)")
    g.add_argument("--sequence-parallel", action="store_true", default=None, help="megatron sequence parallel (TP>1)")
    g.add_argument("--micro-batch", type=_positive, default=None, help="sequences per micro-batch (default 1)")
    g.add_argument("--global-batch", type=_positive, default=None, help="sequences per optimizer step")
    g.add_argument("--recompute", choices=RECOMPUTE_CHOICES, default=None, help="activation recompute (default none)")


def layout_from_args(args: argparse.Namespace, base: Layout = Layout(), **extra) -> Layout:
    """A :class:`Layout` from parsed :func:`add_layout_args` flags over ``base`` (plus ``extra`` fields)."""
    kw = {k: getattr(args, k) for k in ("tp", "pp", "vpp", "sequence_parallel", "micro_batch", "global_batch",
                                        "recompute") if getattr(args, k, None) is not None}
    kw.update({k: v for k, v in extra.items() if v is not None})
    from dataclasses import replace

    return replace(base, **kw)
