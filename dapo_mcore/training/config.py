"""What every training stage's config shares (critic, actor, SFT/RFT): the checkpoint it starts from, the
optimizer and LR schedule, packing, the resumable loop and the parallel layout. A stage subclasses
:class:`TrainingConfig` and redeclares the fields whose default it changes."""
from __future__ import annotations

from dataclasses import dataclass

from dapo_mcore.config import Checked, option
from dapo_mcore.parallel.runtime import ParallelConfig
from dapo_mcore.training.loop import LoopConfig
from dapo_mcore.training.trainer import DECAY_STYLES, OptimConfig


@dataclass
class TrainingConfig(Checked):
    """Optimizer: megatron AdamW (beta1 0.9) with ``OptimizerParamScheduler``; loss sums over tokens or
    actions, so micro-batching never changes the objective."""

    init_path: str = option("", "HF checkpoint the model starts from", identity=False)
    lr: float = option(5e-6, "peak learning rate", gt=0)
    min_lr: float = option(0.0, "learning rate at the end of the decay", ge=0)
    warmup_steps: int = option(0, "linear warm-up steps", ge=0)
    decay_style: str = option("constant", "decay after warm-up: constant | linear | cosine", choices=DECAY_STYLES)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    clip_grad: float = option(1.0, "gradient-norm clip", ge=0)
    adam_beta2: float = option(0.95, "AdamW beta2", ge=0, lt=1)
    epochs: int = option(1, "passes over the training data", ge=1)
    token_budget: int = option(4096, "tokens per packed row", ge=1)
    rows_per_microbatch: int = option(1, "packed rows stacked per micro-batch", flag="--micro-batch", ge=1)
    seed: int = option(0, "seed of the data order (and of a new value head)")
    save_interval: int = option(0, "steps between checkpoints (0: at the end and on interrupt only)", identity=False,
                               ge=0)
    max_steps: int = option(0, "stop, checkpointed and resumable, after this many steps of one invocation (0: no "
                               "limit)", identity=False, ge=0)
    show_progress: bool = option(True, "progress bar", identity=False)
    tensorboard: bool = option(True, "TensorBoard scalars under tb/", identity=False)
    parallel: ParallelConfig = option(factory=ParallelConfig, doc="layout and fast paths")

    def __post_init__(self):
        super().__post_init__()
        self.optim().validate()     # the relation min_lr <= lr

    def optim(self) -> OptimConfig:
        """The optimizer settings (megatron ``OptimizerConfig`` / ``OptimizerParamScheduler``)."""
        return OptimConfig(lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay, clip_grad=self.clip_grad,
                           warmup_steps=self.warmup_steps, decay_style=self.decay_style, adam_beta2=self.adam_beta2)

    def loop(self, name: str, total_steps: int) -> LoopConfig:
        """The training loop's settings for ``total_steps`` steps (``name`` tags the progress bar and TensorBoard)."""
        return LoopConfig(name, total_steps, self.save_interval, self.max_steps, self.show_progress, self.tensorboard)
