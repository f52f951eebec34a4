"""The optional parts of a training step, in one place for the loop: scheduled sampling (trainer.loop.scheduled_sampling),
TREAD token routing (trainer.loop.tread) and the CREPA loss (trainer.loop.crepa). All off by default."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.config.schema import WanforgeConfig
from trainer.flavours import Flavour, get_flavour
from trainer.loop.crepa import Crepa, install_crepa
from trainer.loop.flow import timesteps_from_sigmas
from trainer.loop.scheduled_sampling import apply_rollout
from trainer.loop.tread import TokenRouter, install_tread


@dataclass
class StepExtras:
    cfg: WanforgeConfig
    flavour: Flavour  # resolved once at install (scheduled sampling's predictor feeds the flavour's inputs)
    router: TokenRouter | None = None
    crepa: Crepa | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def install(cls, transformer, cfg: WanforgeConfig, device: torch.device, dtype: torch.dtype) -> StepExtras | None:
        """Hooks and heads on the (unwrapped) transformer; call after LoRA and the memory options, before the
        optimizer is built (the CREPA head trains with the LoRA). None when nothing is enabled."""
        router = install_tread(transformer, cfg.tread)
        crepa = install_crepa(transformer, cfg.crepa, cfg.model, device, dtype, router)
        extras = cls(cfg, get_flavour(cfg.model.flavour), router, crepa)
        return extras if (router is not None or crepa is not None or extras.rollout_on) else None

    @property
    def rollout_on(self) -> bool:
        return self.cfg.scheduled_sampling.probability > 0 or self.cfg.scheduled_sampling.probability_start > 0

    def checkpoint_objects(self) -> dict:
        """The CREPA head is trained state: resumes need it (the LoRA file doesn't hold it)."""
        return {"crepa_head": self.crepa.head} if self.crepa is not None else {}

    def before_forward(self, transformer, step: int, batch: dict, latents, noise, sigmas, noisy, target, text,
                       generator, dtype):
        """(input, target) for the training forward; plans this step's token routing."""
        if self.rollout_on:
            predict = _predictor(transformer, self.cfg, self.flavour, batch, latents, text, dtype)
            noisy, target, rolled = apply_rollout(predict, self.cfg.scheduled_sampling, step, latents, noise, sigmas, noisy,
                                                  target, generator)
            self.metrics["rollout_fraction"] = rolled / latents.shape[0]
        if self.router is not None:
            self.router.plan(noisy.shape, generator)
        if self.crepa is not None:
            self.crepa.reset()
        return noisy, target

    def add_losses(self, loss: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.crepa is None:
            return loss
        crepa_loss = self.crepa.loss(latents)
        self.metrics["crepa_loss"] = float(crepa_loss.detach())
        self.metrics["crepa_score"] = self.crepa.last_score
        return loss + crepa_loss


def _predictor(transformer, cfg: WanforgeConfig, flavour: Flavour, batch: dict, latents, text, dtype):
    """The model's velocity for a subset of the batch, with the flavour's inputs (I2V condition, TI2V first frame).
    It runs the module inside DDP: each rank rolls out its own number of samples, and DDP's forward would sync buffers
    with the other ranks every time (a collective mismatch). A context-parallel group draws alike, so its split forwards
    stay in step; a sharded model's forward needs every rank, which is why sharding refuses scheduled sampling."""
    from trainer.data.conditioning import transformer_inputs

    transformer = getattr(transformer, "module", transformer)  # torch DDP (accelerate.prepare): the model inside
    size = latents.shape[0]

    def predict(x, s, chosen):
        sub = {k: v[chosen.to(v.device)] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (size,)}
        inputs = transformer_inputs(flavour, cfg.model, sub, latents[chosen], x, timesteps_from_sigmas(s), x.device, dtype)
        return transformer(**inputs, encoder_hidden_states=text[chosen], return_dict=False)[0]

    return predict
