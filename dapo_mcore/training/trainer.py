"""A thin megatron training loop shared by the critic and the actor.

:class:`MegatronTrainer` wraps model chunks in megatron DDP, builds the megatron optimizer and LR
scheduler, and runs one optimizer step over a list of micro-batches through megatron's pipeline schedules
(``get_forward_backward_func``: no pipelining, 1F1B or interleaved).

The fast paths (:class:`dapo_mcore.parallel.fast_paths.ResolvedPaths`, the same object the model was built
with) choose bf16 params with fp32 main params (megatron ``Float16OptimizerWithFloat16Params``, grads
reduced in fp32), the distributed optimizer, and overlapped grad reduce / param gather (bucketed).

Losses are **sums with counts** (``calculate_per_token_loss``): a loss function returns
``(loss_sum, count, logs)``; megatron adds the counts over micro-batches and data-parallel ranks and scales
the gradients by ``1 / total count``. So the step optimises the exact global mean (per token for the
critic, per action for the actor) however the micro-batches are sized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from dapo_mcore.packing import dp_share
from dapo_mcore.parallel.fast_paths import PORTABLE

# forward_step(model_chunk, batch) -> (output_tensor, loss_fn); loss_fn(output) -> (sum, count, logs)
ForwardStep = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, Callable]]


DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    """AdamW + LR schedule (megatron ``OptimizerConfig`` / ``OptimizerParamScheduler``)."""

    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "constant"      # constant | linear | cosine

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"decay_style must be constant, linear or cosine, got {self.decay_style!r}")


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float                 # global mean loss (sum / count)
    count: int                  # tokens/actions the mean is over
    grad_norm: float
    lr: float
    logs: dict = field(default_factory=dict)   # other sums from loss_fn, divided by count


class MegatronTrainer:
    """Owns DDP-wrapped chunks, optimizer and scheduler; runs steps and forward-only passes.

    ``paths``: the resolved fast paths the chunks were built with (default: the portable CPU paths); a model
    whose ``params_dtype`` disagrees with them is an error. ``bucket_size``: DDP bucket size in parameters
    (default: megatron's; small values give several buckets, whose reduces overlap the backward pass).
    """

    def __init__(self, chunks: list, optim: OptimConfig, total_steps: int, paths=None,
                 bucket_size: Optional[int] = None):
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        optim.validate()
        paths = PORTABLE if paths is None else paths
        self.optim_cfg = optim
        self.paths = paths
        cfg = chunks[0].config
        if cfg.params_dtype != paths.torch_dtype:
            raise ValueError(f"the model was built with params_dtype={cfg.params_dtype} but the fast paths say "
                             f"{paths.params_dtype}: build it with transformer_config(..., paths=paths)")
        cfg.calculate_per_token_loss = True
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=paths.overlap_grad_reduce,
            overlap_param_gather=paths.overlap_param_gather, use_distributed_optimizer=paths.distributed_optimizer,
            average_in_collective=False, bucket_size=bucket_size)
        self.chunks = [DDP(config=cfg, ddp_config=ddp_cfg, module=c,
                           disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                            clip_grad=optim.clip_grad, bf16=paths.bf16, params_dtype=cfg.params_dtype,
                            use_distributed_optimizer=paths.distributed_optimizer),
            self.chunks)
        total_steps = max(int(total_steps), 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(total_steps, optim.warmup_steps + 1), lr_decay_style=optim.decay_style,
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=total_steps,
            wd_incr_style="constant")
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss
        one = len(self.chunks) == 1
        cfg.no_sync_func = self.chunks[0].no_sync if one else [c.no_sync for c in self.chunks]
        if paths.overlap_grad_reduce:   # the schedules launch each chunk's reduce as soon as its grads are ready
            cfg.grad_sync_func = self.chunks[0].start_grad_sync if one else [c.start_grad_sync for c in self.chunks]
        self.config = cfg
        self.step = 0

    def train_step(self, microbatches: Sequence[dict], forward_step: ForwardStep) -> StepResult:
        """One optimizer step over ``microbatches`` (this DP rank's share of the global batch)."""
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = forward_backward(self.chunks, microbatches, forward_step, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError(f"optimizer step {self.step} skipped: non-finite gradients")
        self.scheduler.step(increment=1)
        self.step += 1
        sums = self._reduce(outs)
        count = sums.pop("__count__")
        loss = sums.pop("loss") / max(count, 1)
        return StepResult(loss=loss, count=int(count), grad_norm=float(grad_norm or 0.0),
                          lr=self.optimizer.param_groups[0]["lr"], logs={k: v / max(count, 1) for k, v in sums.items()})

    def sync_params(self) -> None:
        """Finish an overlapped param all-gather (distributed optimizer with ``overlap_param_gather``): after
        :meth:`train_step` the updated params reach the model only in the next forward's pre-hooks, so call
        this before reading params directly (checkpoint, HF export). A no-op otherwise."""
        if self.paths.overlap_param_gather:
            for c in self.chunks:
                c.start_param_sync(force_sync=True)

    @torch.no_grad()
    def forward_only(self, microbatches: Sequence[dict], forward_step: ForwardStep) -> dict:
        """Run ``forward_step`` without gradients; returns the loss_fn sums over all micro-batches/DP."""
        for c in self.chunks:
            c.eval()
        return self._reduce(forward_backward(self.chunks, microbatches, forward_step, forward_only=True))

    @staticmethod
    def _reduce(outs: list) -> dict:
        """Sum the loss_fn logs over micro-batches (last PP stage), then broadcast/all-reduce them."""
        from megatron.core import parallel_state as ps

        keys: list[str] = []
        vals: list[float] = []
        if ps.is_pipeline_last_stage(ignore_virtual=True) and outs:
            keys = sorted(outs[0].keys())
            vals = [float(sum(float(o[k]) for o in outs)) for k in keys]
        obj = [keys]
        torch.distributed.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(),
                                                group=ps.get_pipeline_model_parallel_group())
        keys = obj[0]
        t = torch.tensor(vals if vals else [0.0] * len(keys), dtype=torch.float64)
        torch.distributed.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        return dict(zip(keys, t.tolist()))


def forward_backward(chunks: list, microbatches: Sequence[dict], forward_step: ForwardStep, forward_only: bool) -> list:
    """Run megatron's schedule (no pipelining / 1F1B / interleaved) over ``microbatches``.

    Returns the loss_fn logs of each micro-batch on the last pipeline stage (empty list elsewhere).
    Every rank of a pipeline must pass the same number of micro-batches.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("no micro-batches to run")
    seq = max(int(mb["input_ids"].shape[1]) for mb in microbatches)
    mbs = int(microbatches[0]["input_ids"].shape[0])

    def megatron_step(data_iterator, model):
        return forward_step(model, next(data_iterator))

    iters: Any = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return get_forward_backward_func()(
        forward_step_func=megatron_step, data_iterator=iters, model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)


@torch.no_grad()
def forward_collect(chunks: list, microbatches: Sequence[dict], forward_step: ForwardStep) -> list[dict]:
    """Forward-only pass returning each micro-batch's loss_fn logs (tensors) on every rank of its pipeline.

    For inference-style outputs (critic values, log-probs): the loss_fn puts them in its logs dict.
    """
    from megatron.core import parallel_state as ps

    for c in chunks:
        c.eval()
    outs = forward_backward(chunks, microbatches, forward_step, forward_only=True)
    obj = [[{k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in o.items()} for o in outs]]
    torch.distributed.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
    return obj[0]


def collect_per_microbatch(chunks: list, mbs: Sequence[dict], forward_step: ForwardStep, field: str,
                           pad_id: int) -> list[list[float]]:
    """Forward-only over DP x PP: ``mbs`` are spread round robin over data-parallel ranks (see
    :func:`dapo_mcore.packing.dp_share`); returns, for every micro-batch in order, the list in the loss_fn
    logs under ``field``. The same result on every rank."""
    from megatron.core import parallel_state as ps

    outs = forward_collect(chunks, dp_share(mbs, pad_id), forward_step)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = {(i * dp + r): o[field].tolist() for i, o in enumerate(outs) if i * dp + r < len(mbs)}
    parts: list = [None] * dp
    torch.distributed.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    merged: dict[int, list[float]] = {}
    for part in parts:
        merged.update(part)
    return [merged[i] for i in range(len(mbs))]


def make_loss_fn(compute: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]):
    """Adapt ``compute(output) -> (loss_sum, count, extra_sums)`` to megatron's per-token loss protocol.

    The returned logs hold ``loss`` (the sum), ``__count__`` and every extra sum, as floats, so
    :meth:`MegatronTrainer._reduce` can add them over micro-batches and ranks.
    """

    def loss_fn(output: torch.Tensor):
        loss_sum, count, extra = compute(output)
        count_t = torch.as_tensor(count, dtype=torch.int).reshape(())
        logs = {"loss": loss_sum.detach().double(), "__count__": count_t.double()}
        logs.update({k: torch.as_tensor(v).detach().double() for k, v in extra.items()})
        return loss_sum, count_t, logs

    return loss_fn
