"""Hugging Face ``config.json`` -> :class:`ArchSpec` -> megatron ``TransformerConfig``.

Supported families: Llama (``llama``) and Qwen2 (``qwen2``): GQA, RoPE (theta; Llama-3.1 ``llama3``
scaling), RMSNorm, SwiGLU, qkv bias for Qwen2, tied or untied embeddings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from dapo_mcore.parallel.fast_paths import PORTABLE

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


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

    @property
    def hf_architecture(self) -> str:
        return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise :class:`ModelConfigError` if TP/PP cannot split this model."""
        for what, n in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                        ("vocab_size", self.vocab_size), ("intermediate_size", self.ffn_hidden_size)):
            if n % tp:
                raise ModelConfigError(f"tensor parallel size {tp} does not divide {what}={n}")
        if self.num_layers % pp:
            raise ModelConfigError(f"pipeline parallel size {pp} does not divide num_hidden_layers={self.num_layers}")


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


def arch_from_dict(cfg: dict, source: str = "config") -> ArchSpec:
    """Build an :class:`ArchSpec` from a parsed HF config dict; ``source`` names it in errors."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise ModelConfigError(f"{source}: unsupported architecture model_type={mt!r} (architectures={archs}); "
                               f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, factor = _rope(cfg)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"{source}: hidden_act={act!r}; only SwiGLU (silu) is supported")
        if mt == "qwen2" and cfg.get("use_sliding_window"):
            raise ModelConfigError(f"{source}: use_sliding_window=true is not supported")
        if mt == "llama" and cfg.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=true is not supported")
        return ArchSpec(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
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
        )
    except KeyError as e:
        raise ModelConfigError(f"{source}: missing required key {e.args[0]!r}") from None


def load_arch(model_dir: str | Path) -> ArchSpec:
    """Read ``<model_dir>/config.json``; clear errors for a missing/corrupt/unsupported config."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {model_dir} an HF checkpoint directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}:{e.lineno}: corrupt JSON: {e.msg}") from None
    return arch_from_dict(cfg, str(path))


def transformer_config(arch: ArchSpec, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, paths=None,
                       **overrides: Any):
    """The megatron ``TransformerConfig`` for ``arch`` under the given layout and fast paths.

    ``paths``: a :class:`dapo_mcore.parallel.fast_paths.ResolvedPaths` (default: the portable CPU paths,
    fp32); it sets ``params_dtype``/``bf16``, ``sequence_parallel`` and activation recompute (``"full"``:
    every layer, method uniform; ``"selective"``: core attention). Fusions that need CUDA kernels (masked
    softmax, bias-dropout) are enabled only when CUDA is present; dropout is 0 (offline RL fine-tuning; CPU
    has no per-rank RNG streams).
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    paths = PORTABLE if paths is None else paths
    arch.check_parallel(tp, pp)
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
    if paths.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif paths.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    kw.update(overrides)
    return TransformerConfig(**kw)
