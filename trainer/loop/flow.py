"""Rectified-flow matching as Wan was trained: x_t = (1-s)*x0 + s*noise, the model predicts noise - x0.

Noise levels for one Wan 2.2 A14B expert keep the shape of the configured distribution: it draws from that distribution
conditioned on the expert's side, by inverse-CDF (quantile) sampling of the truncated distribution in sigma space, after
the shift: u ~ U(F(b), 1) for the high expert, u ~ U(0, F(b)) for the low one, sigma = F^-1(u). One uniform per sample,
so the run's generator advances the same way every step (exact resume). Distributions without a closed-form quantile
fall back to rejection sampling from sample_sigmas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.config.training import FlowConfig
from trainer.flavours import Flavour, Stage


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


_EPS = 1e-5  # sample_sigmas clamps to (1e-5, 1 - 1e-5); stay inside the same open interval


def _cdf(sigma: float, cfg: FlowConfig) -> float | None:
    """P(s < sigma) of the configured distribution; None when it has no closed form here."""
    if cfg.timestep_sampling == "uniform":
        return sigma
    if cfg.timestep_sampling == "shift":
        # s = k u / (1 + (k-1) u)  <=>  u = s / (k - (k-1) s)
        k = cfg.shift
        return sigma / (k - (k - 1) * sigma)
    if cfg.timestep_sampling == "logit_normal":
        z = (math.log(sigma / (1 - sigma)) - cfg.logit_mean) / cfg.logit_std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return None


def _quantile(u: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        return u
    if cfg.timestep_sampling == "shift":
        k = cfg.shift
        return k * u / (1 + (k - 1) * u)
    # logit_normal
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * math.sqrt(2) * torch.erfinv(2 * u - 1))


def stage_sigmas(batch: int, cfg: FlowConfig, generator: torch.Generator, stage: Stage, boundary: float) -> torch.Tensor:
    """Noise levels for one expert: the configured distribution truncated to sigma >= boundary (high) or < (low)."""
    f_b = _cdf(boundary, cfg)
    if f_b is None:
        return _rejection(batch, cfg, generator, stage, boundary)
    lo, hi = (f_b, 1.0) if stage == "high" else (0.0, f_b)
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
    sigmas = _quantile(lo + (hi - lo) * u, cfg).float()
    # float32 rounding must never put a draw on the wrong side of the boundary
    b = torch.tensor(boundary, dtype=torch.float32, device=sigmas.device)
    if stage == "high":
        return torch.maximum(sigmas, b).clamp(max=1.0 - _EPS)
    below = torch.nextafter(b, torch.zeros_like(b))
    return torch.minimum(sigmas, below).clamp(min=_EPS)


def _rejection(batch: int, cfg: FlowConfig, generator: torch.Generator, stage: Stage, boundary: float) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    have = 0
    for _ in range(10_000):
        s = sample_sigmas(max(batch, 64), cfg, generator)
        s = s[s >= boundary] if stage == "high" else s[s < boundary]
        kept.append(s)
        have += len(s)
        if have >= batch:
            return torch.cat(kept)[:batch]
    raise RuntimeError(f"the timestep distribution almost never reaches the {stage}-noise side of {boundary}")


def sample_training_sigmas(batch: int, cfg: FlowConfig, generator: torch.Generator, flavour: Flavour,
                           stage: Stage | None, boundary: float | None = None) -> torch.Tensor:
    """Noise levels for a micro-batch: restricted to the trained expert's side on Wan 2.2 A14B, else unrestricted.
    `boundary`: the model's own (expert_boundary); default the flavour's."""
    boundary = boundary if boundary is not None else flavour.boundary
    if stage is None or boundary is None:
        return sample_sigmas(batch, cfg, generator)
    return stage_sigmas(batch, cfg, generator, stage, boundary)
