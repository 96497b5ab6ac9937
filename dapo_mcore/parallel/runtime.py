"""Process-group runtime: torch.distributed (NCCL on GPU, gloo on CPU) + megatron ``parallel_state``.

Works under ``torchrun`` (reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) and in a plain
single process (world size 1 on a free local port).
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from dapo_mcore.config import Checked, option
from dapo_mcore.parallel import cpu_patches
from dapo_mcore.parallel.fast_paths import FastPathConfig, FastPathError, ResolvedPaths, resolve


class ParallelConfigError(ValueError):
    """An impossible parallel layout (raised before any process group is touched)."""


@dataclass
class ParallelConfig(Checked):
    """Model-parallel layout and the fast-path switch. DP is derived: ``world_size // (tp * pp * cp)``.

    ``fast_paths`` (:class:`FastPathConfig`) chooses bf16, recompute, the distributed optimizer, overlap and
    the attention/packing kernels; :meth:`paths` resolves it for this machine and layout."""

    tensor_model_parallel_size: int = option(1, "tensor-parallel size (TP)", flag="--tp", ge=1)
    pipeline_model_parallel_size: int = option(1, "pipeline-parallel size (PP)", flag="--pp", ge=1)
    virtual_pipeline_model_parallel_size: Optional[int] = option(None, "virtual pipeline chunks per PP rank",
                                                                 flag="--vpp", ge=1)
    context_parallel_size: int = option(1, "context-parallel size (CP; Transformer Engine attention)", ge=1)
    expert_model_parallel_size: int = option(1, "expert-parallel size (EP; MoE models: experts split over EP "
                                             "ranks, inside DP x CP)", flag="--ep", ge=1)
    sequence_parallel: bool = option(False, "megatron sequence parallelism (GPU, TP > 1)",
                                     flag="--sequence-parallel")
    seed: int = option(1234, "megatron's model-parallel RNG seed")
    timeout_minutes: int = option(30, "process-group timeout (minutes)", ge=1)
    fast_paths: FastPathConfig = option(factory=FastPathConfig, doc="the fast-path switch")

    def paths(self, cuda: Optional[bool] = None) -> ResolvedPaths:
        """The fast paths this run takes (raises :class:`ParallelConfigError` for an impossible choice)."""
        try:
            return resolve(self.fast_paths, self.tensor_model_parallel_size, self.sequence_parallel, cuda=cuda)
        except FastPathError as e:
            raise ParallelConfigError(str(e)) from None

    def validate(self, world_size: int, cuda: bool) -> None:
        """Raise :class:`ParallelConfigError` naming the offending setting."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        for name, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name} must be a positive integer, got {v!r}")
        if world_size % (tp * pp * cp) != 0:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}")
        ep = self.expert_model_parallel_size
        if not isinstance(ep, int) or ep < 1:
            raise ParallelConfigError(f"expert_model_parallel_size must be a positive integer, got {ep!r}")
        if (world_size // pp) % (ep * tp) != 0:
            raise ParallelConfigError(f"expert parallel size {ep} x TP {tp} does not divide the {world_size // pp} "
                                      f"ranks of a pipeline stage (world {world_size} / PP {pp})")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or pp < 2):
            raise ParallelConfigError(
                f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 (got {pp})")
        if cp > 1 and not cuda:
            raise ParallelConfigError("context parallelism needs Transformer Engine attention (GPU)")
        self.paths(cuda=cuda)   # the fast-path rules, sequence parallel's included (fast_paths.resolve)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                              * self.context_parallel_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel(cfg: ParallelConfig) -> None:
    """Initialise torch.distributed (if needed) and megatron's model-parallel groups from ``cfg``.

    On CPU this first applies :mod:`dapo_mcore.parallel.cpu_patches` and uses gloo; the dropout RNG
    tracker is megatron's inference tracker (null ``fork()``), so CPU runs use dropout 0.
    """
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel

    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world_size, cuda)
    if not cuda:
        cpu_patches.apply()

    if not torch.distributed.is_initialized():
        backend = "nccl" if cuda else "gloo"
        timeout = timedelta(minutes=cfg.timeout_minutes)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / SLURM launcher: env:// rendezvous
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain single process: a private free port, no environment left behind for child processes
            torch.distributed.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                                 rank=0, world_size=1, timeout=timeout)
    world_size = torch.distributed.get_world_size()
    cfg.validate(world_size, cuda)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        distributed_timeout_minutes=cfg.timeout_minutes,
    )
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(cfg.seed)


def destroy_parallel() -> None:
    """Tear down megatron groups and the default process group (a no-op without one)."""
    if not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def process_group_scope():
    """Around a process's entry point (the CLI, its torchrun worker): tear megatron's groups and the
    process group down on the way out. Exiting with gloo's worker threads alive can abort the interpreter at
    shutdown ("terminate called without an active exception", SIGABRT) after the work has finished."""
    try:
        yield
    finally:
        destroy_parallel()


def layout_summary() -> dict:
    """This rank's coordinates in the current layout (for logs)."""
    from megatron.core import parallel_state as ps

    return {
        "rank": torch.distributed.get_rank(),
        "world": torch.distributed.get_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
    }
