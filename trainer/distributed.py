"""What makes N processes train like one: per-micro-batch noise streams and the rank bookkeeping around them."""

from __future__ import annotations

import logging
import os
import sys

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


# Objects holding a gloo/NCCL process group (the DDP-wrapped model) that must not be destroyed before the process ends:
# freeing gloo's process group joins its worker threads while Python holds the GIL, and a worker still releasing the
# tensors of the last collective waits for the GIL, so the rank hangs (seen at the end of two-process CPU runs, more
# often under load). The engine's command keeps them and ends the process without running destructors.
_KEPT_UNTIL_EXIT: list[object] = []


def keep_until_exit(obj: object) -> None:
    """Hold `obj` (and what it references) until the process ends (`exit_if_kept`)."""
    _KEPT_UNTIL_EXIT.append(obj)


def exit_if_kept(code: int) -> None:
    """After a command that kept objects: flush the logs and standard streams and end the process with `code` at once
    (files are already written atomically and closed; no destructor of a process group runs). A no-op otherwise."""
    if not _KEPT_UNTIL_EXIT:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
