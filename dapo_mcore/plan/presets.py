"""Model presets: the real ``config.json`` numbers of the paper's base models and of the Qwen3 family
(dense 8B / 32B, MoE 30B-A3B), as HF config dicts.

Values are copied from the public Hugging Face ``config.json`` of each model (the Instruct variants
share the base model's architecture). Only the keys :func:`dapo_mcore.models.hf_config.arch_from_dict`
reads are kept.
"""
from __future__ import annotations

import json
from pathlib import Path

from dapo_mcore.models.hf_config import ArchSpec, ModelConfigError, arch_from_dict

_QWEN25_7B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
    tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.02,
)

_QWEN3 = dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, head_dim=128,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
    attention_bias=False, use_sliding_window=False, tie_word_embeddings=False, initializer_range=0.02,
)

PRESETS: dict[str, dict] = {
    # Qwen/Qwen2.5-7B(-Instruct): 7.62B parameters
    "Qwen2.5-7B": _QWEN25_7B,
    # Qwen/Qwen2.5-Math-7B(-Instruct): same shapes, 4k context, RoPE theta 1e4
    "Qwen2.5-Math-7B": dict(_QWEN25_7B, max_position_embeddings=4096, rope_theta=10000.0),
    # meta-llama/Llama-3.1-8B(-Instruct): 8.03B parameters, llama3 RoPE scaling
    "Llama-3.1-8B": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=0.02,
    ),
    # Qwen/Qwen2.5-72B(-Instruct): 72.7B parameters
    "Qwen2.5-72B": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=8192,
        intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
        tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.02,
    ),
    # Qwen/Qwen3-8B: 8.19B parameters (q/k RMSNorm, head_dim 128)
    "Qwen3-8B": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    # Qwen/Qwen3-32B: 32.8B parameters (head_dim 128 != hidden / heads = 80)
    "Qwen3-32B": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8),
    # Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active (128 experts of 768, top-8, every layer MoE)
    "Qwen3-30B-A3B": dict(_QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, router_aux_loss_coef=0.001),
}


def resolve_model(name_or_path: str) -> tuple[str, ArchSpec]:
    """A preset name (case-insensitive), an HF checkpoint directory or a ``config.json`` path
    -> ``(display name, ArchSpec)``."""
    for name, cfg in PRESETS.items():
        if name.lower() == name_or_path.lower():
            return name, arch_from_dict(cfg, f"preset {name}")
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{name_or_path}: neither a preset ({', '.join(PRESETS)}) nor an HF config.json "
                               "or checkpoint directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}:{e.lineno}: corrupt JSON: {e.msg}") from None
    return str(name_or_path), arch_from_dict(cfg, str(path))
