"""A loss that is comparable across steps and runs: fixed samples, fixed noise, fixed noise levels."""

from __future__ import annotations

import torch

from trainer.cache import Sample
from trainer.dataset import CachedDataset, Collate
from trainer.flow import flow_loss, flow_target, noisy_input, timesteps_from_sigmas

DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def fixed_eval_loss(
    transformer, samples: list[Sample], text_max_length: int, device: torch.device,
    seed: int = 1234, sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
) -> dict[float, float]:
    """Mean flow-matching loss over `samples` at each noise level in `sigmas`, with noise drawn from `seed`."""
    dataset, collate = CachedDataset(samples), Collate(text_max_length)
    generator = torch.Generator().manual_seed(seed)
    dtype = transformer.patch_embedding.weight.dtype  # the frozen base dtype (the LoRA is fp32)
    was_training = transformer.training
    transformer.eval()
    totals = {s: 0.0 for s in sigmas}
    try:
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            latents = batch["latents"].to(device).float()
            text = batch["text"].to(device, dtype)
            for s in sigmas:
                noise = torch.randn(latents.shape, generator=generator).to(device)
                level = torch.full((latents.shape[0],), s, device=device)
                prediction = transformer(
                    hidden_states=noisy_input(latents, noise, level).to(dtype),
                    timestep=timesteps_from_sigmas(level), encoder_hidden_states=text, return_dict=False,
                )[0]
                totals[s] += float(flow_loss(prediction, flow_target(latents, noise)))
    finally:
        transformer.train(was_training)
    return {s: total / len(dataset) for s, total in totals.items()}
