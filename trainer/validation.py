"""Validation videos: diffusers' WanPipeline with the LoRA, UniPC with the flow shift, written as mp4 at the model's fps."""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import WanforgeConfig
from trainer.dataset import pad_text
from trainer.flavours import FLAVOURS
from trainer.video import write_mp4

PIPELINE_TEXT_LENGTH = 512  # WanPipeline pads prompt embeddings to max_sequence_length=512


@dataclass(frozen=True)
class ValidationSettings:
    prompt: str
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    guidance_scale: float
    flow_shift: float
    steps: int
    seed: int
    fps: int


def settings_for(cfg: WanforgeConfig, first_caption: str | None) -> ValidationSettings:
    v, flavour = cfg.validation, FLAVOURS[cfg.model.flavour]
    frames, height, width = cfg.dataset_shape(0)
    prompt = v.prompt or first_caption
    if not prompt:
        prompt = "a video"
    return ValidationSettings(
        prompt=prompt,
        negative_prompt=v.negative_prompt,
        num_frames=v.num_frames or frames,
        height=v.height or height,
        width=v.width or width,
        guidance_scale=v.guidance_scale if v.guidance_scale is not None else flavour.guidance_scale,
        flow_shift=v.flow_shift or flavour.flow_shift,
        steps=v.num_inference_steps,
        seed=v.seed,
        fps=flavour.fps,
    )


def make_scheduler(flow_shift: float):
    """UniPC multistep on flow sigmas, as the official Wan inference uses it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
    )


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit] or "prompt"


@torch.no_grad()
def render(
    transformer,
    vae,
    settings: ValidationSettings,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    out_dir: Path,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Path:
    """Render one validation video with the transformer as it is now (adapter included); returns the mp4 path."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=make_scheduler(settings.flow_shift), transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        with autocast:
            frames = pipe(
                prompt_embeds=pad_text([prompt_embeds], PIPELINE_TEXT_LENGTH).to(device),
                negative_prompt_embeds=pad_text([negative_embeds], PIPELINE_TEXT_LENGTH).to(device),
                num_frames=settings.num_frames,
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                output_type="np",
            ).frames[0]
    finally:
        transformer.train(was_training)
    return write_mp4(out_dir / f"{slug(settings.prompt)}.mp4", frames, settings.fps)
