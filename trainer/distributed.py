"""What makes N processes train like one: per-micro-batch noise streams and the rank bookkeeping around them."""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive batch indices over the seed space


def noise_generator(seed: int, global_micro_batch: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-batch's timesteps and noise, a pure function of (seed, global micro-batch index).

    Global micro-batch b is what the batch sampler hands to rank b % world_size, so a run on N GPUs draws for each
    sample exactly what one GPU with N-times gradient accumulation draws, and a resume needs no generator state.
    """
    g = torch.Generator(device=device)
    g.manual_seed((seed * _MIX + global_micro_batch + 1) % (2**63 - 1))
    return g
