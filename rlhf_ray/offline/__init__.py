"""Offline stages: supervised fine-tuning (SFT) and the reward model (RM)."""
