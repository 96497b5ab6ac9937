"""Supervised fine-tuning with the megatron trainer, and the rejection-sampling fine-tuning (RFT) control."""
