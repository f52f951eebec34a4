"""The optimizer and LR schedule of a run."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from trainer.config.training import OptimConfig
from trainer.errors import UserError


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError('optim.optimizer = "adamw8bit" needs bitsandbytes: pip install bitsandbytes, or use "adamw"') from None
        if device.type != "cuda":
            raise UserError('optim.optimizer = "adamw8bit" needs a CUDA GPU: use "adamw" on this machine')
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps
    )
