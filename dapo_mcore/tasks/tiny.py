"""Tiny HF checkpoints built locally (no downloads): a BPE tokenizer trained with
``tokenizers`` and a small Qwen2- or Llama-style model, saved as a normal HF directory that
``AutoTokenizer`` / ``AutoModelForCausalLM`` load offline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from dapo_mcore.tasks.chain import make_problems

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 320, out_dir: str | Path | None = None):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    ``"\\n"`` stays a token of its own (byte-level pre-tokenisation splits on whitespace), so
    step boundaries are token boundaries. EOS = ``<|endoftext|>``, PAD = ``<|pad|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1],
                                   bos_token=None, clean_up_tokenization_spaces=False)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


@dataclass
class TinyModelConfig:
    """Shape of a tiny test/demo model (defaults: ~0.2M parameters, TP=2 friendly)."""

    arch: str = "qwen2"          # "qwen2" (qkv bias) or "llama"
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    vocab_multiple: int = 64     # config.vocab_size = len(tokenizer) rounded up to this


def make_hf_config(cfg: TinyModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    """The transformers config of a tiny model."""
    from transformers import LlamaConfig, Qwen2Config

    v = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    common = dict(vocab_size=v, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=1e-6, tie_word_embeddings=cfg.tie_word_embeddings, eos_token_id=eos_id,
                  pad_token_id=pad_id, bos_token_id=None,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if cfg.arch == "qwen2":
        return Qwen2Config(**common)
    if cfg.arch == "llama":
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    raise ValueError(f"TinyModelConfig.arch must be 'qwen2' or 'llama', got {cfg.arch!r}")


def build_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str], cfg: TinyModelConfig | None = None,
                          seed: int = 0, tokenizer_vocab: int = 320) -> Path:
    """Train a tokenizer on ``texts``, initialise a random tiny model and save both to ``out_dir``.

    Returns ``out_dir``. Weights are fp32 safetensors; the init is seeded.
    """
    from transformers import AutoModelForCausalLM

    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, tokenizer_vocab, out)
    hf_cfg = make_hf_config(cfg, len(tok), tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "dapo_tiny.json").write_text(json.dumps(cfg.__dict__, indent=1))
    return out


def bench_checkpoint(out_dir: str | Path, hidden: int, layers: int, max_position_embeddings: int = 2048,
                     seed: int = 0) -> Path:
    """The random model the CPU benchmarks time: a Qwen2 of ``hidden`` x ``layers`` (4 heads, 2 KV heads,
    SwiGLU of 3 x hidden) with a tokenizer trained on 500 chain-task solutions; saved to ``out_dir``."""
    texts = [p.prompt + p.solution() for p in make_problems(500, 0)]
    cfg = TinyModelConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_layers=layers, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=max_position_embeddings)
    return build_tiny_checkpoint(out_dir, texts, cfg, seed=seed)
