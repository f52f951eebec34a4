"""The diffusers pipeline a flavour validates with, around the transformer being trained.

- Wan 2.1 T2V: WanPipeline.
- Wan 2.2 A14B: the trained expert in its own slot (`transformer` = high noise, `transformer_2` = low noise) with
  `boundary_ratio`; with model.wan_validation_load_other_stage the other expert is loaded for its timesteps (frozen,
  base weights), otherwise the trained expert renders every step and the pipeline has no boundary.
- I2V (2.1 / 2.2): WanImageToVideoPipeline with the conditioning image (+ CLIP encoder and processor for 2.1).
- TI2V-5B: WanImageToVideoPipeline with expand_timesteps (first-frame conditioning, as trained).
- VACE (2.1, and the 2.2 VACE-Fun experts as above): WanVACEPipeline with the control clip, mask and reference images
  of trainer.outputs.vace_validation; they are shown above the results in the contact sheet (`wanforge_sheet_rows`).

The conditioning image is the first frame of the first training clip, at the validation size.
"""

from __future__ import annotations

import torch

from trainer.config.schema import WanforgeConfig
from trainer.flavours import get_flavour


def validation_image(cfg: WanforgeConfig, height: int, width: int):
    """The first frame of the first clip of the first dataset, as a PIL image of the validation size."""
    from PIL import Image

    from trainer.data.discovery import scan_dataset
    from trainer.data.video import load_clip
    from trainer.errors import UserError

    clips = scan_dataset(cfg.datasets[0]).clips
    if not clips:
        raise UserError(f"{cfg.datasets[0].path}: image-to-video validation needs a clip for its first frame")
    frame = load_clip(clips[0].video, 1, height, width, get_flavour(cfg.model.flavour).fps)[0]
    return Image.fromarray(frame.numpy())


def _experts(cfg: WanforgeConfig, trained, device: torch.device, load_other: bool):
    """(transformer, transformer_2, boundary_ratio) for a Wan 2.2 A14B flavour."""
    from trainer.model.components import expert_subfolder, load_transformer
    from trainer.model.experts import expert_boundary

    flavour = get_flavour(cfg.model.flavour)
    if not load_other:
        return trained, None, None  # the trained expert runs every step
    dtype = next(trained.parameters()).dtype
    other = load_transformer(cfg.model, dtype, subfolder=expert_subfolder(cfg.model, other=True)).to(device).eval()
    other.requires_grad_(False)
    pair = (trained, other) if flavour.stage == "high" else (other, trained)
    return pair[0], pair[1], expert_boundary(cfg.model)


def flavour_pipeline(cfg: WanforgeConfig, transformer, vae, scheduler, device: torch.device, height: int, width: int,
                     transformer_2=None, num_frames: int | None = None):
    """The flavour's pipeline; its extra call arguments (image, guidance_scale_2, VACE's video / mask /
    reference_images) ride in `wanforge_call_kwargs`. `transformer_2`: a trained low-noise expert
    (train_both_experts), used instead of loading the base one. `num_frames`: the render's length (VACE controls)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanVACEPipeline

    from trainer.model.experts import ExpertPair, expert_boundary

    flavour = get_flavour(cfg.model.flavour)
    call: dict = {}
    boundary = None
    second = None
    if isinstance(transformer, ExpertPair):  # train_both_experts: both trained experts render (both on the device)
        transformer, transformer_2 = transformer.high.to(device), transformer.low.to(device)
    if flavour.is_expert:
        if transformer_2 is not None:
            first, second, boundary = transformer, transformer_2, expert_boundary(cfg.model)
        else:
            first, second, boundary = _experts(cfg, transformer, device, cfg.model.wan_validation_load_other_stage)
        if boundary is not None and flavour.guidance_scale_low is not None:
            call["guidance_scale_2"] = flavour.guidance_scale_low
    else:
        first = transformer
    rows: list = []
    if flavour.is_vace:
        from trainer.outputs.vace_validation import validation_control

        pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=first,
                               transformer_2=second, boundary_ratio=boundary)
        frames = num_frames or cfg.validation.num_frames or cfg.dataset_shape(0)[0]
        control = validation_control(cfg, frames, height, width)
        call.update(control.call_kwargs())
        rows = control.sheet_rows()
    elif flavour.task == "t2v" or (flavour.task == "ti2v" and cfg.model.wan_force_2_1_time_embedding):
        # TI2V with the Wan 2.1 time embedding: one timestep per sample, so text-to-video without the image
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=first,
                           transformer_2=second, boundary_ratio=boundary)
    else:
        encoder = processor = None
        if flavour.image_encoder:
            from trainer.model.components import load_image_encoder

            encoder, processor = load_image_encoder(cfg.model, torch.float32)
            encoder = encoder.to(device).eval()
        pipe = WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=first, transformer_2=second,
            image_encoder=encoder, image_processor=processor, boundary_ratio=boundary,
            expand_timesteps=flavour.expand_timesteps,
        )
        call["image"] = validation_image(cfg, height, width)
    pipe.wanforge_call_kwargs = call
    pipe.wanforge_sheet_rows = rows  # shown above the rendered videos in the contact sheet
    pipe.wanforge_experts = expert_slots(flavour, first, second, boundary)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expert_slots(flavour, first, second, boundary) -> dict[str, object]:
    """Which transformer renders which expert's steps, for validation adapters that name an expert: "high" / "low" on
    Wan 2.2 A14B ("both" reaches every slot); a model without experts has the one slot "all"."""
    if not flavour.is_expert:
        return {"all": first}
    if boundary is not None and second is not None:
        return {"high": first, "low": second}
    return {flavour.stage: first}  # the trained expert renders every step


def lora_load_kwargs(cfg: WanforgeConfig, pipe) -> dict:
    """load_lora_weights arguments that put a LoRA of the flavour's expert into the slot that expert occupies."""
    flavour = get_flavour(cfg.model.flavour)
    if flavour.stage == "low" and getattr(pipe, "transformer_2", None) is not None:
        return {"load_into_transformer_2": True}
    return {}
