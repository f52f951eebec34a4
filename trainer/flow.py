"""Rectified-flow matching as Wan was trained: x_t = (1-s)*x0 + s*noise, the model predicts noise - x0."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import FlowConfig


def sample_sigmas(batch: int, cfg: FlowConfig, generator: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1), one per sample, from the run's own generator (so a resume draws the same ones)."""
    if cfg.timestep_sampling == "logit_normal":
        s = torch.randn(batch, generator=generator, device=generator.device)
        s = torch.sigmoid(s * cfg.logit_std + cfg.logit_mean)
    else:
        u = torch.rand(batch, generator=generator, device=generator.device)
        s = u if cfg.timestep_sampling == "uniform" else cfg.shift * u / (1 + (cfg.shift - 1) * u)
    return s.clamp(1e-5, 1.0 - 1e-5)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: s * 1000, as the Wan schedulers feed it."""
    return sigmas * 1000.0


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error computed in fp32 whatever the autocast dtype."""
    return F.mse_loss(prediction.float(), target.float())
