"""FLOPs per token and estimated tokens/s at a stated MFU (derivation: ``docs/planner.md``)."""
from __future__ import annotations

from dataclasses import dataclass

from dapo_mcore.models.hf_config import ArchSpec
from dapo_mcore.plan.layout import Layout
from dapo_mcore.plan.memory import STAGES


@dataclass(frozen=True)
class GpuSpec:
    """Peak dense bf16 tensor FLOP/s of one GPU and its memory (vendor datasheet numbers)."""

    name: str = "H100-SXM-80GB"
    peak_flops: float = 989e12
    memory_gb: float = 80.0


GPUS = {
    "H100-SXM-80GB": GpuSpec(),
    "A100-SXM-80GB": GpuSpec("A100-SXM-80GB", 312e12, 80.0),
    "H200-141GB": GpuSpec("H200-141GB", 989e12, 141.0),
}


def forward_flops_per_token(arch: ArchSpec, seq: int, value_head: bool = False) -> float:
    """Forward FLOPs per token: ``2 * (matmul weights)`` + causal attention ``4 * L * n*d * s/2``.

    Matmul weights per layer: QKV ``H*(n+2g)*d``, proj ``n*d*H``, SwiGLU ``3*H*F``; plus the LM head
    ``V*H`` (a scalar for the value model). MoE: ``F`` is the active width (top-k x expert width) plus the
    router ``E*H``. Norms, RoPE and softmax are ignored (< 1%).
    """
    h, f, d, n, g = arch.hidden_size, arch.active_ffn_hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    per_layer = h * (n + 2 * g) * d + n * d * h + 3 * h * f + (arch.num_experts * h if arch.is_moe else 0)
    head = h if value_head else arch.vocab_size * h
    attn = 4 * n * d * seq / 2
    return 2.0 * (arch.num_layers * per_layer + head) + arch.num_layers * attn


@dataclass(frozen=True)
class Throughput:
    flops_per_token: float      # per processed token, forward+backward(+recompute) as the stage runs
    bubble: float               # pipeline bubble fraction of the step time
    tokens_per_s: float         # whole job
    tokens_per_s_per_gpu: float
    step_seconds: float         # one optimizer step (global batch x seq length tokens)


def estimate(arch: ArchSpec, layout: Layout, stage: str, mfu: float = 0.4, gpu: GpuSpec = GpuSpec()) -> Throughput:
    """Tokens/s of ``stage`` if the GPUs sustain ``mfu`` of peak while computing, minus the 1F1B bubble
    ``(pp-1)/(m*vpp)`` relative to the compute time (``m`` micro-batches per step)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    value_head, trains, _ = STAGES[stage]
    fwd = forward_flops_per_token(arch, layout.seq_length, value_head)
    mult = (4.0 if layout.recompute == "full" else 3.0) if trains else 1.0
    fpt = fwd * mult
    m = max(layout.num_microbatches, 1)
    bubble_rel = (layout.pp - 1) / (m * (layout.vpp or 1))
    per_gpu = mfu * gpu.peak_flops / fpt / (1.0 + bubble_rel)
    total = per_gpu * layout.world
    step_tokens = layout.global_batch * layout.seq_length
    return Throughput(fpt, bubble_rel / (1.0 + bubble_rel), total, per_gpu, step_tokens / total)
