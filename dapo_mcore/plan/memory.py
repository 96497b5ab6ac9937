"""Per-GPU memory model of the Megatron stages (derivation: ``docs/planner.md``).

All sizes are bytes. ``p`` is the activation/param dtype size (2 for bf16, 4 for fp32); statistics
kept in fp32 (RMSNorm rstd, softmax, log-sum-exp) count 4 bytes.

Parameter counts follow megatron-core's ``GPTModel`` with the layer spec this project builds
(:func:`dapo_mcore.models.gpt.build_model`) exactly; ``tests/test_plan.py`` checks them against real
models on 1 and 2 ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dapo_mcore.models.hf_config import ArchSpec
from dapo_mcore.plan.layout import Layout

GB = 1e9
ATTN_IMPLS = ("te", "local")    # te: GPU (TE spec, flash attention); local: megatron local spec (CPU path)


# ---------------------------------------------------------------- parameters

def layer_params(arch: ArchSpec, tp: int = 1, ep: int = 1) -> int:
    """Parameters of one transformer layer on one TP (and, MoE, EP) rank: RMSNorm x2, QKV(+bias), proj,
    q/k RMSNorm ``2*d`` (Qwen3, replicated), and either the SwiGLU fc1/fc2 (``3*H*F/tp``) or, MoE, the
    router ``E*H`` (replicated) and ``E/ep`` experts of ``3*H*F_moe/tp`` each (expert TP = TP)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q = arch.num_heads * arch.head_dim
    qkv = q + 2 * arch.num_kv_heads * arch.head_dim
    attn = (h * qkv + (qkv if arch.qkv_bias else 0) + q * h) // tp + (2 * arch.head_dim if arch.qk_norm else 0)
    if arch.is_moe:
        mlp = arch.num_experts * h + arch.num_experts // ep * (3 * h * arch.moe_ffn_hidden_size // tp)
    else:
        mlp = 3 * h * f // tp
    return attn + mlp + 2 * h


def rank_params(arch: ArchSpec, tp: int = 1, pp: int = 1, pp_rank: int = 0, vpp: Optional[int] = None,
                value_head: bool = False, ep: int = 1) -> int:
    """Parameters held by one GPU at pipeline rank ``pp_rank`` (all its VPP chunks), TP-sharded.

    First PP stage: word embeddings ``V*H/tp``. Last stage: final RMSNorm ``H`` plus the LM head ``V*H/tp``
    (untied; or, when tied and PP > 1, megatron's copy of the embeddings on the last stage) or, for the
    value model, the scalar head ``H + 1`` (replicated over TP).
    """
    v, h = arch.vocab_size, arch.hidden_size
    chunks = vpp or 1
    n = arch.num_layers // (pp * chunks) * chunks * layer_params(arch, tp, ep)
    if pp_rank == 0:
        n += v * h // tp
    if pp_rank == pp - 1:
        n += h
        if value_head:
            n += h + 1
        elif not arch.tie_word_embeddings or pp > 1:
            n += v * h // tp
    return n


def total_params(arch: ArchSpec, value_head: bool = False) -> int:
    """Parameters of the whole model (one copy)."""
    return rank_params(arch, value_head=value_head)


# ---------------------------------------------------------------- activations

def layer_activation_bytes(arch: ArchSpec, tokens: int, seq: int, tp: int = 1, sp: bool = False, p: int = 2,
                           impl: str = "te") -> float:
    """Bytes one transformer layer saves for backward for a micro-batch of ``tokens = b * seq`` tokens.

    ``impl="local"`` (megatron local spec, unfused attention, the CPU path; measured exactly in the tests):
    per token ``p*(6H + 4d + 4*n*d/t + 5F/t) + 8 + 4*n*s/t`` (+ ``p*n*s/t`` when p != 4: the softmax is
    computed in fp32 and cast back) plus the ``[s, s]`` bool causal mask.
    ``impl="te"`` (GPU: Transformer Engine spec, flash attention, fused SwiGLU): per token
    ``p*(4H/t_sp + 4d + (2*n*d + 2*g*d + 3F)/t) + 4*(2 + n/t)``; no ``s^2`` term.
    ``t_sp`` is ``t`` with sequence parallel, else 1; ``d`` head dim, ``n``/``g`` query/KV heads.
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
    h, f, d = arch.hidden_size, arch.active_ffn_hidden_size, arch.head_dim   # MoE: top-k x expert width
    n, g = arch.num_heads, arch.num_kv_heads
    tsp = tp if sp else 1
    if impl == "local":
        per_tok = p * (6 * h / tsp + 4 * d + 4 * n * d / tp + 5 * f / tp) + 8 + n * seq / tp * (4 + (p if p != 4 else 0))
        return tokens * per_tok + seq * seq
    per_tok = p * (4 * h / tsp + 4 * d + (2 * n * d + 2 * g * d + 3 * f) / tp) + 4 * (2 + n / tp)
    return tokens * per_tok


def recompute_layer_bytes(arch: ArchSpec, tokens: int, tp: int = 1, sp: bool = False, p: int = 2) -> float:
    """Bytes a layer keeps under full recompute: its input (``p*H/t_sp``) and the RoPE freqs (fp32, ``4*d``)."""
    return tokens * (p * arch.hidden_size / (tp if sp else 1) + 4 * arch.head_dim)


def head_activation_bytes(arch: ArchSpec, tokens: int, tp: int = 1, sp: bool = False, p: int = 2,
                          impl: str = "te") -> float:
    """Final RMSNorm + output-layer input saved on the last stage (``(3H or 2H) * p + 4`` per token)."""
    k = 3 if impl == "local" else 2
    return tokens * (k * p * arch.hidden_size / (tp if sp else 1) + 4)


def backward_transient_bytes(arch: ArchSpec, tokens: int, seq: int, tp: int = 1, p: int = 2,
                             impl: str = "te") -> float:
    """Working set of one layer's backward beyond the saved tensors.

    ``local``: gradients of the attention probabilities and scores, ``2 * 4 * n*s/t`` per token (fp32);
    ``te``: flash attention has no ``s^2`` tensor; the SwiGLU gradients ``p * 3F/t`` per token dominate
    (an estimate: no GPU to measure it on).
    """
    if impl == "local":
        return tokens * 8.0 * arch.num_heads * seq / tp
    return tokens * p * 3.0 * arch.active_ffn_hidden_size / tp


def logits_peak_bytes(arch: ArchSpec, tokens: int, tp: int = 1, p: int = 2, fused: bool = True) -> float:
    """Peak of the log-prob/loss path over one micro-batch on the last stage.

    Naive (megatron output layer + ``vocab_parallel_cross_entropy`` on logits upcast to fp32), at the
    start of backward: the fp32 softmax the loss saved (its gradient is formed in place), the copy
    of the logits gradient in the model dtype made by megatron's ``[s, b, V] -> [b, s, V]`` contiguous
    transpose, and, when the model dtype is not fp32, the cast of the gradient:
    ``T * V/t * (4 + p + p')``, ``p' = p if p != 4 else 0`` (8 bytes per logit in fp32 and in bf16).
    Fused kernel (:mod:`dapo_mcore.ops`): per token only fp32 running max / sum-exp / target logit and
    the saved log-sum-exp (16 bytes); the ``[block_t, block_v]`` tile lives in SRAM/L2.
    """
    if fused:
        return tokens * 16.0
    v = arch.vocab_size / tp
    return tokens * v * (4 + p + (p if p != 4 else 0))


# ---------------------------------------------------------------- stages

STAGES = {
    # name: (value head, trains, description)
    "critic": (True, True, "critic training (value head, BCE)"),
    "score": (False, False, "ref log-probs / critic scoring (forward only)"),
    "actor": (False, True, "actor training (DAPO loss)"),
}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU bytes of one stage on its worst pipeline rank."""

    stage: str
    pp_rank: int
    params: int                 # parameters on this GPU
    weights: float
    grads: float
    optimizer: float            # with the layout's optimizer setting
    optimizer_alt: float        # with the other setting (dist-opt on <-> off)
    activations: float          # with the layout's recompute setting
    activations_alt: float      # with the other recompute setting
    logits_fused: float
    logits_naive: float
    transient: float            # one layer's backward working set beyond saved tensors
    reserve: float              # CUDA context, NCCL buffers, allocator fragmentation (an assumption)

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reserve

    @property
    def total_fused(self) -> float:
        """Peak: the loss path's peak and a layer's backward working set never coexist (the logits are
        freed before the last layer's backward starts)."""
        return self.static + self.activations + max(self.logits_fused, self.transient)

    @property
    def total_naive(self) -> float:
        return self.static + self.activations + max(self.logits_naive, self.transient)

    @property
    def naive_extra(self) -> float:
        """What the naive logits path adds to the peak."""
        return self.total_naive - self.total_fused


def optimizer_bytes(params: int, bf16: bool, distributed: bool, dp: int) -> float:
    """Adam states (+ fp32 main params under bf16): 12 B/param bf16, 8 B/param fp32; sharded over DP with
    the distributed optimizer (megatron's table: bf16 ``6 + 12/d`` incl. params+grads)."""
    per = 12 if bf16 else 8
    return params * per / (dp if distributed else 1)


def _in_flight(layout: Layout, pp_rank: int, num_layers: int) -> float:
    """Layer-micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak (1F1B/interleaved)."""
    pp, m = layout.pp, layout.num_microbatches
    if pp == 1:
        return float(num_layers)
    v = layout.vpp or 1
    chunks = min((pp - pp_rank - 1) * 2 + (v - 1) * pp + 1, m * v) if v > 1 else min(pp - pp_rank, m)
    return chunks * num_layers / (pp * v)


def stage_memory(arch: ArchSpec, layout: Layout, stage: str, impl: str = "te", reserve_gb: float = 4.0
                 ) -> MemoryBreakdown:
    """Memory of ``stage`` (see :data:`STAGES`) on the pipeline rank that needs the most (fused kernel)."""
    return max(stage_memory_ranks(arch, layout, stage, impl, reserve_gb), key=lambda m: m.total_fused)


def peak_bytes(ranks: list[MemoryBreakdown], fused: bool = True) -> float:
    """The job's per-GPU peak over pipeline ranks, with the fused kernel or the naive logits path."""
    return max(m.total_fused if fused else m.total_naive for m in ranks)


def stage_memory_ranks(arch: ArchSpec, layout: Layout, stage: str, impl: str = "te", reserve_gb: float = 4.0
                       ) -> list[MemoryBreakdown]:
    """Memory of ``stage`` on the first and the last pipeline rank (the extremes: the first holds the most
    in-flight activations and the embeddings, the last the LM head and the logits)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    value_head, trains, _ = STAGES[stage]
    p = 2 if layout.bf16 else 4
    tp, sp = layout.tp, layout.sequence_parallel
    tokens = layout.micro_batch * layout.seq_length
    seq = layout.seq_length
    out: list[MemoryBreakdown] = []
    for r in sorted({0, layout.pp - 1}):
        n = rank_params(arch, tp, layout.pp, r, layout.vpp, value_head)
        weights = float(n * p)
        grads = float(n * 4) if trains else 0.0
        opt = optimizer_bytes(n, layout.bf16, layout.distributed_optimizer, layout.dp) if trains else 0.0
        opt_alt = optimizer_bytes(n, layout.bf16, not layout.distributed_optimizer, layout.dp) if trains else 0.0
        full = layer_activation_bytes(arch, tokens, seq, tp, sp, p, impl)
        if trains:
            lf = _in_flight(layout, r, arch.num_layers)
            none_ = lf * full
            rec = lf * recompute_layer_bytes(arch, tokens, tp, sp, p) + full   # + the layer being recomputed
            act, act_alt = (rec, none_) if layout.recompute == "full" else (none_, rec)
        else:
            act = act_alt = full          # forward only: one layer's working set at a time
        last = r == layout.pp - 1
        if last and trains:
            act += head_activation_bytes(arch, tokens, tp, sp, p, impl)
            act_alt += head_activation_bytes(arch, tokens, tp, sp, p, impl)
        if r == 0:
            act += 8 * tokens                # int64 input ids
            act_alt += 8 * tokens
        if last and not value_head:
            lf_fused, lf_naive = logits_peak_bytes(arch, tokens, tp, p, True), logits_peak_bytes(arch, tokens, tp, p, False)
        else:
            lf_fused = lf_naive = float(tokens * 4 * 3) if last else 0.0   # value head: [T, 1] logits/sigmoid
        transient = backward_transient_bytes(arch, tokens, seq, tp, p, impl) if trains else 0.0
        mb = MemoryBreakdown(stage, r, n, weights, grads, opt, opt_alt, act, act_alt, lf_fused, lf_naive,
                             transient, reserve_gb * GB)
        out.append(mb)
    return out
