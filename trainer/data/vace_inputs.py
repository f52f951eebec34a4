"""VACE conditioning, built once per sample as diffusers' WanVACEPipeline builds it and cached beside the latents.

For a control clip (+ mask, + reference images) at the sample's bucket size, in the operations and order of
WanVACEPipeline.preprocess_conditions -> prepare_video_latents -> prepare_masks (written out: those methods need a
whole pipeline, and the cache step has only the VAE loaded; tests/test_vace.py compares the result with the real
methods):
- pixels in [-1, 1] (VideoProcessor); the mask thresholded at 0.5 splits the control into the kept part
  ("inactive" = video x (1 - mask)) and the part to generate ("reactive" = video x mask), each VAE-encoded (posterior
  mode) and normalised: 16 + 16 latent channels. No mask: everything is reactive.
- the mask's first channel packed 8x8 pixels per latent cell (64 channels), frames resampled nearest-exact to the
  latent frames.
- each reference image letterboxed onto a white canvas of the clip's size, encoded as one latent frame, with zero
  "reactive" channels and a zero mask, put in front of the clip's frames (each next reference before the last one).
The result is `vace_context` [96, refs + F', h, w], what the pipeline feeds the transformer as control_hidden_states.
Training also prepends the reference latents to the clip's latents (trainer.data.dataset): at inference the pipeline
generates those frames too and drops them, so the model sees the same layout in training and in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from trainer.data.buckets import Bucket
from trainer.data.vace_pairing import ControlFiles
from trainer.data.video import fit_to_size, read_frames_at, read_image, sample_times


class LatentSpec(Protocol):
    """What of trainer.data.cache.LatentSpec the control inputs are read by (the clip's times, crop and size)."""

    bucket: Bucket
    fps: float
    start: float
    crop: bool
    crop_at: tuple[float, float]
    pre_scale: float | None
    control: ControlFiles | None
    source_width: int

VACE_KEY = "vace_context"  # the cache entry's tensor (beside "latents")
LATENT_CHANNELS = 16  # inactive, then reactive: 2 x the Wan 2.1 VAE's channels


@dataclass
class VaceFrames:
    """A sample's control inputs at its bucket size: [F, H, W, 3] uint8 control and mask, references as read."""

    control: np.ndarray
    mask: np.ndarray | None
    references: list[np.ndarray]


def _read(path: Path, spec: LatentSpec, pre_scale: float | None) -> np.ndarray:
    b = spec.bucket

    def fit(frame: np.ndarray) -> np.ndarray:
        # another resolution of the same picture gets the same relative crop window (trainer.data.vace_pairing
        # refuses other aspects): a pre-scale relative to the clip's width
        scale = pre_scale * spec.source_width / frame.shape[1] if pre_scale and spec.source_width else None
        return fit_to_size(frame, b.width, b.height, spec.crop, spec.crop_at, scale)

    if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}:
        return read_image(path, fit)
    return read_frames_at(path, sample_times(spec.start, b.frames, spec.fps), fit)


CONTROL_FAILURE = "control input"  # how a failure to read a clip's control inputs starts (the clip itself is fine)


def read_vace_frames(spec: LatentSpec) -> VaceFrames:
    """The control clip and mask at the clip's frame times, crop and size; a mask image is used for every frame."""
    from PIL import Image, UnidentifiedImageError

    from trainer.data.probe import MediaError

    files = spec.control
    current = files.control
    try:
        control = _read(files.control, spec, spec.pre_scale)
        mask = None
        if files.mask is not None:
            current = files.mask
            mask = _read(files.mask, spec, spec.pre_scale)
            if len(mask) == 1 and spec.bucket.frames > 1:
                mask = np.repeat(mask, spec.bucket.frames, axis=0)
        refs = []
        for current in files.references:
            with Image.open(current) as im:
                refs.append(np.asarray(im.convert("RGB")).copy())
    except (MediaError, UnidentifiedImageError, OSError) as err:
        raise MediaError(f"{CONTROL_FAILURE} {current}: {err}") from None
    return VaceFrames(control, mask, refs)


# ---------------------------------------------------------------- the pipeline's preparation, written out


def _pil_frames(frames: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(f) for f in frames]


def pipeline_pixels(frames: VaceFrames, vae_spatial: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(video [1, 3, F, H, W] in [-1, 1], mask [1, 3, F, H, W] in [0, 1], reference canvases [3, H, W]) as
    WanVACEPipeline.preprocess_conditions makes them from PIL frames of this size."""
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=vae_spatial)
    height, width = frames.control.shape[1:3]
    video = processor.preprocess_video(_pil_frames(frames.control), height, width).float()
    if frames.mask is not None:
        mask = processor.preprocess_video(_pil_frames(frames.mask), height, width).float()
        mask = torch.clamp((mask + 1) / 2, min=0, max=1)
    else:
        mask = torch.ones_like(video)
    canvases = []
    for array in frames.references:
        from PIL import Image

        image = processor.preprocess(Image.fromarray(array), None, None)
        img_height, img_width = image.shape[-2:]
        scale = min(height / img_height, width / img_width)
        new_height, new_width = int(img_height * scale), int(img_width * scale)
        resized = torch.nn.functional.interpolate(image, size=(new_height, new_width), mode="bilinear",
                                                  align_corners=False).squeeze(0)
        top, left = (height - new_height) // 2, (width - new_width) // 2
        canvas = torch.ones(3, height, width, dtype=torch.float32)
        canvas[:, top : top + new_height, left : left + new_width] = resized
        canvases.append(canvas)
    return video, mask, canvases


def _normalised(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Posterior mode, (mu - mean) * (1 / std) in float32, back to the VAE's dtype (as prepare_video_latents)."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
    mu = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode()
    return ((mu.float() - mean) * inv_std).to(vae.dtype)


def pack_mask(mask: torch.Tensor, num_refs: int, vae_spatial: int = 8, temporal: int = 4, patch: int = 2) -> torch.Tensor:
    """[3, F, H, W] mask -> [vae_spatial^2, refs + F', H/8, W/8]: WanVACEPipeline.prepare_masks for one sample."""
    _, frames, height, width = mask.shape
    new_frames = (frames + temporal - 1) // temporal
    new_height = height // (vae_spatial * patch) * patch
    new_width = width // (vae_spatial * patch) * patch
    packed = mask[0].reshape(frames, new_height, vae_spatial, new_width, vae_spatial)
    packed = packed.permute(2, 4, 0, 1, 3).flatten(0, 1)
    packed = torch.nn.functional.interpolate(packed.unsqueeze(0), size=(new_frames, new_height, new_width),
                                             mode="nearest-exact").squeeze(0)
    if num_refs:
        packed = torch.cat([torch.zeros_like(packed[:, :num_refs]), packed], dim=1)
    return packed


@torch.no_grad()
def vace_context(vae, frames: VaceFrames, device: torch.device) -> torch.Tensor:
    """[96, refs + F', h, w] float32: the control latents (inactive, reactive, references in front) and the packed
    mask, exactly the pipeline's conditioning_latents for one sample (before its cast to the transformer's dtype)."""
    spatial = 2 ** len(vae.temperal_downsample)
    temporal = 2 ** sum(vae.temperal_downsample)
    video, mask, canvases = pipeline_pixels(frames, spatial)
    binary = torch.where(mask > 0.5, 1.0, 0.0).to(vae.dtype)
    video = video.to(vae.dtype)
    inactive = _normalised(vae, video * (1 - binary), device)
    reactive = _normalised(vae, video * binary, device)
    latents = torch.cat([inactive, reactive], dim=1)[0]
    for canvas in canvases:
        ref = _normalised(vae, canvas.to(vae.dtype)[None, :, None], device)[0]
        ref = torch.cat([ref, torch.zeros_like(ref)], dim=0)
        latents = torch.cat([ref, latents], dim=1)
    packed = pack_mask(mask[0].to(device), len(canvases), spatial, temporal)
    return torch.cat([latents.float(), packed.float()], dim=0).cpu()


# ---------------------------------------------------------------- what a training sample holds


def training_latents(latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The clip's latents [C, F', h, w] with the reference latents in front, as the pipeline lays out the frames it
    generates (references first, dropped after denoising): [C, refs + F', h, w]."""
    refs = context.shape[1] - latents.shape[1]
    if refs < 0:
        raise ValueError(f"the VACE context has {context.shape[1]} latent frames, fewer than the clip's {latents.shape[1]}")
    if refs == 0:
        return latents
    return torch.cat([context[:LATENT_CHANNELS, :refs].to(latents.dtype), latents], dim=1)
