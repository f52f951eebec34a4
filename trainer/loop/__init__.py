"""The training loop: the recipe (train.py), one micro-step (flow matching and its extras: TREAD, CREPA, scheduled
sampling), the periodic actions, checkpoints and resume, the optimizer and the guard against NaN and signals."""
