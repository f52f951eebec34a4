"""wanforge trainer: the Wan LoRA training engine."""
