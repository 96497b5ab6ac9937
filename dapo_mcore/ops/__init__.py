"""Fused ops of dapo-mcore: per-token target log-probs without [T, V] logits, and the DAPO loss.

Backends: Triton (CUDA), C++ (CPU, csrc/), plain PyTorch reference; see :mod:`.dispatch`.
"""
from dapo_mcore.ops.dapo_loss import DapoLossOutput, dapo_loss
from dapo_mcore.ops.target_logprob import fused_target_logprob

__all__ = ["fused_target_logprob", "dapo_loss", "DapoLossOutput"]
