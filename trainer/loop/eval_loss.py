"""A loss that is comparable across steps and runs: fixed samples, fixed noise, fixed noise levels.

Each of `eval_buckets` equal bins of the noise level s in (0, 1) is measured at its centre (five buckets:
0.1, 0.3, ..., 0.9), with noise drawn from its own seeded generator, so two runs with the same seed log the same
numbers and one run's curve moves only because the adapter did.
"""

from __future__ import annotations

import time

import torch

from trainer.config.schema import WanforgeConfig
from trainer.data.cache import Sample
from trainer.data.dataset import CachedDataset, Collate
from trainer.loop.flow import flow_target, noisy_input

DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def bucket_sigmas(buckets: int) -> tuple[float, ...]:
    """The centre noise level of each of `buckets` equal bins of (0, 1)."""
    return tuple((k + 0.5) / buckets for k in range(buckets))


def bucket_label(sigma: float, buckets: int) -> str:
    """The bucket's timestep range, e.g. eval_loss/t200-400 (timestep = s * 1000)."""
    k = min(int(sigma * buckets), buckets - 1)
    return f"eval_loss/t{round(1000 * k / buckets)}-{round(1000 * (k + 1) / buckets)}"


def split_eval_samples(cfg: WanforgeConfig, per_dataset: list[list[Sample]]) -> tuple[list[list[Sample]], list[Sample]]:
    """(samples to train on, per dataset; the fixed eval samples). The eval samples are the last clips of the first
    dataset; with eval_holdout they leave training (never all of it: at least one clip stays)."""
    v = cfg.validation
    first = per_dataset[0] if per_dataset else []
    if v.eval_every_n_steps == 0 or not first:
        return per_dataset, []
    count = min(v.eval_samples, len(first) - 1 if v.eval_holdout else len(first))
    if count <= 0:
        return per_dataset, []
    eval_samples = first[-count:]
    if v.eval_holdout:
        return [first[:-count]] + per_dataset[1:], eval_samples
    return per_dataset, eval_samples


@torch.no_grad()
def fixed_eval_loss(
    transformer, samples: list[Sample], text_max_length: int, device: torch.device,
    seed: int = 1234, sigmas: tuple[float, ...] = DEFAULT_SIGMAS, cfg: WanforgeConfig | None = None,
) -> dict[float, float]:
    """Mean flow-matching loss over `samples` at each noise level in `sigmas`, with noise drawn from `seed`.
    With `cfg`, the flavour's inputs (I2V / TI2V conditioning) as in training. Not `training_step` itself: that draws
    its noise levels, switches experts and adds the step extras, which would make the number move between steps."""
    from trainer.data.conditioning import build_conditioning, with_conditioning
    from trainer.flavours import get_flavour
    from trainer.loop.training_step import flow_matching_loss  # training's own forward and loss; only the noise is fixed

    dataset, collate = CachedDataset(samples), Collate(text_max_length)
    flavour = get_flavour(cfg.model.flavour if cfg is not None else "tiny")
    if cfg is not None:
        dataset, collate = with_conditioning(
            dataset, collate, build_conditioning(cfg, [s.latent_path for s in samples], device, show_progress=False)
        )
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
                totals[s] += float(flow_matching_loss(
                    transformer, flavour, cfg.model if cfg is not None else None, batch, latents,
                    noisy_input(latents, noise, level), flow_target(latents, noise), level, text, device, dtype))
    finally:
        transformer.train(was_training)
    return {s: total / len(dataset) for s, total in totals.items()}


def eval_record(transformer, samples: list[Sample], cfg: WanforgeConfig, device: torch.device, step: int) -> dict:
    """{"step", "eval_loss" (mean over buckets), "eval_loss/tA-B" per bucket} for metrics.jsonl and trackers."""
    buckets = cfg.validation.eval_buckets
    losses = fixed_eval_loss(transformer, samples, cfg.train.text_max_length, device,
                             seed=cfg.validation.eval_seed, sigmas=bucket_sigmas(buckets), cfg=cfg)
    record: dict = {"step": step, "eval_loss": sum(losses.values()) / len(losses)}
    record.update({bucket_label(s, buckets): loss for s, loss in losses.items()})
    return record


def log_eval_loss(accelerator, transformer, samples: list[Sample], cfg: WanforgeConfig, run, device, step: int) -> dict | None:
    """Measure on the main process (the others wait), append to metrics.jsonl and the trackers."""
    from trainer.model.context_parallel import is_context_parallel
    from trainer.model.sharding import is_sharded

    record, model = None, accelerator.unwrap_model(transformer)
    started = time.perf_counter()
    if accelerator.is_main_process or is_sharded(model) or is_context_parallel(model):  # a collective forward
        record = eval_record(model, samples, cfg, device, step)
        record["eval_s"] = round(time.perf_counter() - started, 3)  # its wall time (the losses are read back: synced)
    if accelerator.is_main_process:
        run.log_metrics(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    accelerator.wait_for_everyone()
    return record
