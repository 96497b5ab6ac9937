"""Fused ops of dapo-mcore: per-token target log-probs without [T, V] logits, the DAPO loss, and the
DAPO loss fused with the log-probs (logits once: 6·T·H·V).

Backends: Triton (CUDA), C++ (CPU, csrc/), plain PyTorch reference; see :mod:`.dispatch`.
"""
from dapo_mcore.ops.dapo_loss import DapoLossOutput, dapo_loss
from dapo_mcore.ops.fused_dapo_loss import FusedDapoLossOutput, fused_dapo_loss
from dapo_mcore.ops.target_logprob import fused_target_logprob

__all__ = ["fused_target_logprob", "dapo_loss", "DapoLossOutput", "fused_dapo_loss", "FusedDapoLossOutput"]
