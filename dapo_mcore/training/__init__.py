"""The megatron trainer, its resumable loop and checkpoints, the training-stage config, and the scoring
services the stages share (per-token log-probs, values)."""
