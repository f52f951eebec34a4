"""One training micro-step, the same for the loop and the benches: the flow-matching loss of a cached batch."""

from __future__ import annotations

import torch

from trainer.config.model import ModelConfig
from trainer.config.schema import WanforgeConfig
from trainer.data.conditioning import loss_region, transformer_inputs
from trainer.flavours import Flavour, get_flavour
from trainer.loop.flow import sample_training_sigmas
from trainer.loop.flow import flow_loss, flow_target, noisy_input, timesteps_from_sigmas
from trainer.loop.step_extras import StepExtras
from trainer.model.experts import active_stage, expert_boundary, select_expert


def training_step(transformer, batch, cfg: WanforgeConfig, generator: torch.Generator, device, dtype,
                  extras: StepExtras | None = None, step: int = 0, flavour: Flavour | None = None) -> torch.Tensor:
    """One micro-batch's flow-matching loss (the caller runs backward): the step's expert, noise levels on its side
    of the boundary, noised latents, the flavour's conditioning inputs, TREAD / CREPA / scheduled sampling.
    `flavour`: the config's, resolved once by the caller (looked up here when not given)."""
    latents = batch["latents"].to(device, non_blocking=True).float()
    text = batch["text"].to(device, non_blocking=True)
    flavour = flavour or get_flavour(cfg.model.flavour)
    stage = active_stage(cfg, step, flavour)
    select_expert(transformer, stage, device)  # train_both_experts: the step's expert on the GPU
    sigmas = sample_training_sigmas(latents.shape[0], cfg.flow, generator, flavour, stage, expert_boundary(cfg.model))
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
    noisy = noisy_input(latents, noise, sigmas)
    target = flow_target(latents, noise)
    if extras is not None:
        noisy, target = extras.before_forward(transformer, step, batch, latents, noise, sigmas, noisy, target,
                                              text.to(dtype), generator, dtype)
    loss = flow_matching_loss(transformer, flavour, cfg.model, batch, latents, noisy, target, sigmas, text, device, dtype)
    return extras.add_losses(loss, latents) if extras is not None else loss


def flow_matching_loss(transformer, flavour: Flavour, model: ModelConfig | None, batch: dict, latents: torch.Tensor,
                       noisy: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor, device,
                       dtype) -> torch.Tensor:
    """The transformer's loss on `noisy` at noise levels `sigmas`: the flavour's inputs as its pipeline feeds them (I2V
    condition channels, TI2V clean first frame), the loss over the region it trains. The training step and the
    fixed-noise eval loss share it, so eval measures exactly what training optimises."""
    inputs = transformer_inputs(flavour, model, batch, latents, noisy, timesteps_from_sigmas(sigmas).to(device),
                                device, dtype)
    prediction = transformer(**inputs, encoder_hidden_states=text.to(dtype), return_dict=False)[0]
    return flow_loss(*loss_region(flavour, prediction, target))
