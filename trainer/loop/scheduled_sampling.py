"""Scheduled sampling ("rollout"): sometimes train on the model's own denoising instead of exactly noised inputs.

For a sample drawn at noise level s, with probability p the input is made by noising the clean latents to
s_src = min(1, s + sigma_offset) with the sample's own noise, then letting the model (current LoRA, no gradient, no
TREAD) take `steps` Euler flow steps from s_src down to s. The target becomes the velocity that carries that input
to the clean latents, (x - x0) / s: it equals noise - x0 when the rollout is exact, and otherwise teaches the model to
correct its own drift (exposure bias). Samples below MIN_SIGMA are not rolled out: dividing by a tiny s would blow
up the rollout's error.

Cost: `steps` extra forward passes without gradient per rolled-out sample. A training step with gradient
checkpointing costs about 3-4 forward passes, so the expected slowdown is about p x steps / 3.5 (p = 0.5, steps = 4:
~1.6x the time per step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.config.training import ScheduledSamplingConfig

MIN_SIGMA = 0.05


def rollout_probability(cfg: ScheduledSamplingConfig, step: int) -> float:
    """p at an optimizer step: a linear ramp from probability_start to probability over ramp_steps."""
    if cfg.ramp_steps <= 0 or step >= cfg.ramp_steps:
        return cfg.probability
    return cfg.probability_start + (cfg.probability - cfg.probability_start) * step / cfg.ramp_steps


# predict(x, s, chosen) -> the model's velocity (noise - x0 prediction, float) for the samples `chosen` of the batch,
# at inputs x and noise levels s; the caller builds the flavour's inputs (I2V condition, TI2V first frame).
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise(predict: Predict, x: torch.Tensor, s_from: torch.Tensor, s_to: torch.Tensor, steps: int,
            chosen: torch.Tensor) -> torch.Tensor:
    """Euler flow steps x(s_from) -> x(s_to), per sample: x += (s_next - s) * v."""
    view = (-1,) + (1,) * (x.ndim - 1)
    for i in range(steps):
        s = s_from + (s_to - s_from) * (i / steps)
        s_next = s_from + (s_to - s_from) * ((i + 1) / steps)
        x = x + (s_next - s).view(view) * predict(x, s, chosen).float()
    return x


def apply_rollout(predict: Predict, cfg: ScheduledSamplingConfig, step: int, x0: torch.Tensor, noise: torch.Tensor,
                  sigmas: torch.Tensor, noisy: torch.Tensor, target: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input, target, how many samples were rolled out) for one micro-batch."""
    p = rollout_probability(cfg, step)
    if p <= 0:
        return noisy, target, 0
    draw = torch.rand(x0.shape[0], generator=generator, device=generator.device).to(sigmas.device)
    chosen = ((draw < p) & (sigmas >= MIN_SIGMA)).nonzero().flatten()
    if chosen.numel() == 0:
        return noisy, target, 0
    s = sigmas[chosen].float()
    s_src = (s + cfg.sigma_offset).clamp(max=1.0)
    view = (-1,) + (1,) * (x0.ndim - 1)
    start = (1 - s_src).view(view) * x0[chosen] + s_src.view(view) * noise[chosen]
    rolled = denoise(predict, start, s_src, s, cfg.steps, chosen)
    noisy, target = noisy.clone(), target.clone()
    noisy[chosen] = rolled.to(noisy.dtype)
    target[chosen] = ((rolled - x0[chosen].float()) / s.view(view)).to(target.dtype)
    return noisy, target, int(chosen.numel())
