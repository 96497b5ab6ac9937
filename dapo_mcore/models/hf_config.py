"""Hugging Face ``config.json`` -> :class:`ArchSpec` -> megatron ``TransformerConfig``.

Supported families (``model_type``), all GQA + RoPE (theta; Llama-3.1 ``llama3`` scaling) + RMSNorm +
SwiGLU, tied or untied embeddings:

* ``llama``, ``mistral``: no qkv bias (Llama's ``attention_bias`` honoured); explicit ``head_dim``;
* ``qwen2``: qkv bias;
* ``qwen3``: q/k RMSNorm over ``head_dim`` (megatron ``qk_layernorm``), explicit ``head_dim``, no qkv bias;
* ``qwen3_moe``: Qwen3 attention + a mixture-of-experts MLP in every layer (softmax router, top-k,
  ``norm_topk_prob``), through megatron-core's MoE layer;
* ``mixtral``: Llama attention + MoE (softmax router, top-k, renormalised).

A sliding-window config (``sliding_window`` set, Mistral/Mixtral) is accepted: attention is full causal,
which equals the sliding window exactly while a sequence fits the window, and the model refuses longer
positions (:attr:`ArchSpec.max_attention_span`). Quantised checkpoints (``quantization_config``) are
refused with what to do instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from dapo_mcore.parallel.fast_paths import PORTABLE

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM", "mistral": "MistralForCausalLM",
                    "mixtral": "MixtralForCausalLM"}


GGUF_ADVICE = ("De-quantise it into an HF safetensors checkpoint first: `python -m dapo_mcore.models.importer` "
               "for the models it knows, else transformers' AutoModelForCausalLM.from_pretrained(dir, gguf_file=F) "
               "and save_pretrained of a plain model with its weights")


class ModelConfigError(ValueError):
    """An HF config this project cannot build (unsupported architecture or setting)."""


@dataclass(frozen=True)
class ArchSpec:
    """The architecture facts megatron needs, read from an HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool
    init_std: float = 0.02
    rope_scaling_factor: Optional[float] = None  # Llama-3.1 "llama3" RoPE scaling
    qk_norm: bool = False                        # Qwen3: RMSNorm of q and k per head (weights [head_dim])
    num_experts: Optional[int] = None            # MoE: experts per layer (every layer is MoE)
    moe_ffn_hidden_size: Optional[int] = None    # MoE: intermediate size of one expert
    moe_topk: int = 0                            # MoE: experts per token
    moe_norm_topk: bool = True                   # MoE: renormalise the top-k router probabilities
    sliding_window: Optional[int] = None         # Mistral/Mixtral: attention window (positions beyond refused)

    @property
    def hf_architecture(self) -> str:
        return HF_ARCHITECTURES[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def active_ffn_hidden_size(self) -> int:
        """The SwiGLU width one token goes through: top-k x expert width for MoE, else the dense width."""
        return self.moe_topk * self.moe_ffn_hidden_size if self.is_moe else self.ffn_hidden_size

    @property
    def max_attention_span(self) -> Optional[int]:
        """Longest sequence (position + 1) the full-causal attention reproduces exactly (the sliding window)."""
        return self.sliding_window

    def _tp_divides(self) -> tuple[tuple[str, int], ...]:
        ffn = (("moe_intermediate_size", self.moe_ffn_hidden_size) if self.is_moe
               else ("intermediate_size", self.ffn_hidden_size))
        return (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                ("vocab_size", self.vocab_size), ffn)

    def valid_tp_sizes(self, upto: int = 64) -> list[int]:
        """The TP sizes (up to ``upto``) that divide heads, KV heads, vocab and the MLP width."""
        return [tp for tp in range(1, upto + 1) if all(n % tp == 0 for _, n in self._tp_divides())]

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raise :class:`ModelConfigError` if TP/PP/EP cannot split this model."""
        for what, n in self._tp_divides():
            if n % tp:
                msg = f"tensor parallel size {tp} does not divide {what}={n}"
                if tp > 1:
                    msg += f" (valid TP sizes for this model: {', '.join(map(str, self.valid_tp_sizes(max(tp, 16))))})"
                raise ModelConfigError(msg)
        if self.num_layers % pp:
            raise ModelConfigError(f"pipeline parallel size {pp} does not divide num_hidden_layers={self.num_layers}")
        if ep > 1 and not self.is_moe:
            raise ModelConfigError(f"expert parallel size {ep} given for a dense model ({self.model_type})")
        if self.is_moe and self.num_experts % ep:
            raise ModelConfigError(f"expert parallel size {ep} does not divide num_experts={self.num_experts}")


def _rope(cfg: dict) -> tuple[float, Optional[float]]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        src = params if params.get("rope_type") == "llama3" else scaling
        if float(src.get("low_freq_factor", 1.0)) != 1.0 or float(src.get("high_freq_factor", 4.0)) != 4.0 \
                or int(src.get("original_max_position_embeddings", 8192)) != 8192:
            raise ModelConfigError("llama3 RoPE scaling is supported only with megatron's fixed "
                                   "low/high freq factors 1/4 and original context 8192")
        return float(theta), float(src.get("factor", 8.0))
    raise ModelConfigError(f"unsupported RoPE type {rope_type!r} (supported: default, llama3)")


def _quantisation_error(cfg: dict, source: str) -> Optional[str]:
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
    return (f"{source}: a quantised checkpoint (quantization_config.quant_method={method!r}); this project "
            "trains and converts full-precision weights: de-quantise it first (load it with transformers and "
            "save_pretrained an fp32/bf16 copy without quantization_config; a GGUF file: "
            "`python -m dapo_mcore.models.importer` or transformers' from_pretrained(dir, gguf_file=...))")


def _moe_fields(mt: str, cfg: dict, source: str) -> dict:
    if mt not in MOE_MODEL_TYPES:
        return {}
    n = cfg.get("num_experts") if mt == "qwen3_moe" else None
    n = int(n or cfg.get("num_local_experts") or 0)
    if n < 1:
        raise ModelConfigError(f"{source}: MoE config without num_experts / num_local_experts")
    if mt == "qwen3_moe":
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = list(cfg.get("mlp_only_layers") or [])
        if step != 1 or dense:
            raise ModelConfigError(f"{source}: dense layers among MoE layers (decoder_sparse_step={step}, "
                                   f"mlp_only_layers={dense}) are not supported; every layer must be MoE")
        ffn = int(cfg["moe_intermediate_size"])
        norm = bool(cfg.get("norm_topk_prob", False))
    else:
        ffn = int(cfg["intermediate_size"])
        norm = True   # Mixtral always renormalises the top-k weights
    if float(cfg.get("router_jitter_noise") or 0.0):
        raise ModelConfigError(f"{source}: router_jitter_noise is not supported")
    topk = int(cfg.get("num_experts_per_tok", 2))
    if not 1 <= topk <= n:
        raise ModelConfigError(f"{source}: num_experts_per_tok={topk} must be in 1..{n}")
    if topk == 1 and norm:
        raise ModelConfigError(f"{source}: top-1 routing with renormalised weights (every weight 1.0) is not "
                               "supported by megatron's router (it needs the pre-softmax router for top-1)")
    return dict(num_experts=n, moe_ffn_hidden_size=ffn, moe_topk=topk, moe_norm_topk=norm)


def arch_from_dict(cfg: dict, source: str = "config") -> ArchSpec:
    """Build an :class:`ArchSpec` from a parsed HF config dict; ``source`` names it in errors."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise ModelConfigError(f"{source}: unsupported architecture model_type={mt!r} (architectures={archs}); "
                               f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if (err := _quantisation_error(cfg, source)) is not None:
        raise ModelConfigError(err)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        theta, factor = _rope(cfg)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"{source}: hidden_act={act!r}; only SwiGLU (silu) is supported")
        if mt in ("qwen2", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
            raise ModelConfigError(f"{source}: use_sliding_window=true is not supported")
        if mt == "llama" and cfg.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=true is not supported")
        window = cfg.get("sliding_window") if mt in ("mistral", "mixtral") else None
        moe = _moe_fields(mt, cfg, source)
        return ArchSpec(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            qkv_bias=(mt == "qwen2") or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.02)),
            rope_scaling_factor=factor,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            sliding_window=int(window) if window else None,
            **moe,
        )
    except KeyError as e:
        raise ModelConfigError(f"{source}: missing required key {e.args[0]!r}") from None


def load_arch(model_dir: str | Path) -> ArchSpec:
    """Read ``<model_dir>/config.json``; clear errors for a missing/corrupt/unsupported config."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        gguf = sorted(Path(model_dir).glob("*.gguf")) if Path(model_dir).is_dir() else []
        if gguf:
            raise ModelConfigError(f"{model_dir}: holds a GGUF file ({gguf[0].name}) and no config.json: a quantised "
                                   f"llama.cpp checkpoint. {GGUF_ADVICE}")
        raise FileNotFoundError(f"{path}: no config.json (is {model_dir} an HF checkpoint directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}:{e.lineno}: corrupt JSON: {e.msg}") from None
    return arch_from_dict(cfg, str(path))


def transformer_config(arch: ArchSpec, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, paths=None,
                       ep: int = 1, **overrides: Any):
    """The megatron ``TransformerConfig`` for ``arch`` under the given layout and fast paths.

    ``paths``: a :class:`dapo_mcore.parallel.fast_paths.ResolvedPaths` (default: the portable CPU paths,
    fp32); it sets ``params_dtype``/``bf16``, ``sequence_parallel`` and activation recompute (``"full"``:
    every layer, method uniform; ``"selective"``: core attention). Fusions that need CUDA kernels (masked
    softmax, bias-dropout) are enabled only when CUDA is present; dropout is 0 (offline RL fine-tuning; CPU
    has no per-rank RNG streams).

    MoE (``arch.is_moe``; ``ep``: expert parallel size, experts' tensor parallel size = ``tp``): softmax
    router in fp32, top-k (pre-softmax when the top-k probabilities are not renormalised), dropless, no
    load-balancing loss (offline RL fine-tuning of a trained router). The token dispatcher is ``alltoall``
    with CUDA and ``allgather`` without (megatron's alltoall dispatcher builds a ``torch.cuda.Stream``);
    the allgather dispatcher needs ``variable_seq_lengths=False``: under PP every micro-batch then has the
    same shape, and under EP every EP rank the same number of tokens.
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    paths = PORTABLE if paths is None else paths
    arch.check_parallel(tp, pp, ep)
    cuda = torch.cuda.is_available()
    dtype = paths.torch_dtype
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=arch.init_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=paths.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        apply_rope_fusion=False, masked_softmax_fusion=cuda, bias_activation_fusion=False,
        bias_dropout_fusion=cuda, gradient_accumulation_fusion=False, persist_layer_norm=False,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
        # interleaved PP on gloo gives silently wrong gradients with batched p2p (notes)
        batch_p2p_comm=cuda and vpp is None, batch_p2p_sync=cuda,
    )
    if arch.qk_norm:
        kw.update(qk_layernorm=True)
    if arch.is_moe:
        dispatcher = "alltoall" if cuda else "allgather"
        kw.update(num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
                  moe_router_topk=arch.moe_topk, moe_router_pre_softmax=not arch.moe_norm_topk,
                  moe_router_score_function="softmax", moe_router_dtype="fp32",
                  moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
                  moe_token_dispatcher_type=dispatcher, variable_seq_lengths=dispatcher != "allgather",
                  expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)
    if paths.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif paths.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    kw.update(overrides)
    return TransformerConfig(**kw)
