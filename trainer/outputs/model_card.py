"""The Hub model card (README.md) of a trained LoRA: metadata huggingface_hub understands, then how to use it."""

from __future__ import annotations

import json
from trainer.config.schema import WanforgeConfig
from trainer.flavours import FLAVOURS
from trainer.model.components import base_model_path
from trainer.outputs.validation_videos import ValidationSettings


def trigger_words(cfg: WanforgeConfig) -> list[str]:
    if cfg.hub.trigger_words:
        return list(cfg.hub.trigger_words)
    return [cfg.validation.instance_prompt] if cfg.validation.instance_prompt else []


def _base_model(cfg: WanforgeConfig) -> str | None:
    """A Hub id for the card's base_model field; None for a local folder (the Hub would reject a path)."""
    if cfg.model.pretrained_model_name_or_path:
        path = cfg.model.pretrained_model_name_or_path
        return path if path.count("/") == 1 and not path.startswith((".", "/", "~")) else None
    return FLAVOURS[cfg.model.flavour].hub_id


def build_model_card(
    cfg: WanforgeConfig,
    settings: ValidationSettings,
    lora_file: str,
    step: int,
    videos: list[tuple[str, str]] = (),
    contact_sheet: str | None = None,
    ema_lora_file: str | None = None,
) -> str:
    """videos: (path in the repo, prompt) of the preview; paths are relative to the repo root."""
    from huggingface_hub import ModelCard, ModelCardData

    base = _base_model(cfg)
    words = trigger_words(cfg)
    data = ModelCardData(
        base_model=base,
        library_name="diffusers",
        pipeline_tag="text-to-video",
        tags=["lora", "wan", "text-to-video", "diffusers", "template:diffusion-lora", "wanforge"],
        instance_prompt=", ".join(words) if words else None,
        widget=[{"text": prompt, "output": {"url": path}} for path, prompt in videos] or None,
    )
    frames, height, width = cfg.dataset_shape(0)
    flavour = FLAVOURS[cfg.model.flavour]
    name = cfg.hub.hub_model_id or "this LoRA"
    image_to_video = flavour.task in ("i2v", "ti2v")
    pipeline = "WanVACEPipeline" if flavour.is_vace else "WanImageToVideoPipeline" if image_to_video else "WanPipeline"
    load_extra = ", load_into_transformer_2=True" if flavour.stage == "low" else ""
    image_arg = 'image=load_image("first_frame.png"), ' if image_to_video else ""
    from trainer.model.lora_names import adapts_vace_blocks

    twin = flavour.is_vace and adapts_vace_blocks(cfg.lora, cfg.model.flavour) and cfg.lora.save_format == "comfyui"
    diffusers_file = "pytorch_lora_weights.safetensors" if twin else lora_file  # trainer.outputs.export: VACE twin
    if flavour.is_vace:
        image_arg = 'video=load_video("control.mp4"), '  # + mask=..., reference_images=[load_image(...)]
    lines = [
        f"# {name}",
        "",
        f"A LoRA for Wan (`{cfg.model.flavour}`: {flavour.description}), base model `{base or base_model_path(cfg.model)}`, "
        f"trained with wanforge for {step} steps.",
        "",
        "## Trigger words",
        "",
        (", ".join(f"`{w}`" for w in words) + ": use them in your prompt.") if words else "None: the LoRA works without a trigger word.",
        "",
        "## Use it",
        "",
    ]
    if getattr(cfg.lora, "lora_type", "lora") == "lycoris":
        lines += [f"`{lora_file}` is a LyCORIS file with kohya-style keys: load it with ComfyUI's native LoRA loader.", ""]
    else:
        lines += [
            "```python",
            "import torch",
            f"from diffusers import {pipeline}",
            "from diffusers.utils import export_to_video" + (", load_image" if image_to_video else "")
            + (", load_video" if flavour.is_vace else ""),
            "",
            f'pipe = {pipeline}.from_pretrained("{base or "<base model>"}", torch_dtype=torch.bfloat16).to("cuda")',
            f'pipe.load_lora_weights("{name}", weight_name="{diffusers_file}"{load_extra})',
            f'video = pipe({image_arg}prompt={json.dumps(settings.prompt, ensure_ascii=False)}, '
            f"num_frames={settings.num_frames}, height={settings.height}, width={settings.width}, "
            f"guidance_scale={settings.guidance_scale:g}).frames[0]",
            f'export_to_video(video, "out.mp4", fps={settings.fps})',
            "```",
            "",
        ]
        if twin:
            lines += [f"`{lora_file}` is the same LoRA for ComfyUI's native LoRA loader (VACE blocks under the "
                      "official Wan VACE names, which diffusers' LoRA loader does not read yet).", ""]
        elif cfg.lora.save_format == "comfyui":
            lines += ["The file also loads in ComfyUI's native LoRA loader.", ""]
    if ema_lora_file:
        lines += [f"`{ema_lora_file}` holds the exponential moving average of the weights (decay {cfg.ema.decay:g}).", ""]
    lines += [
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {base or base_model_path(cfg.model)} |",
        f"| LoRA rank / alpha | {cfg.lora.rank} / {cfg.lora.effective_alpha:g} |",
        f"| target modules | {', '.join(cfg.lora.target_modules)} |",
        f"| steps | {step} |",
        f"| learning rate | {cfg.optim.learning_rate:g} ({cfg.optim.lr_scheduler}, {cfg.optim.lr_warmup_steps} warmup) |",
        f"| batch x accumulation | {cfg.train.train_batch_size} x {cfg.train.gradient_accumulation_steps} |",
        f"| training clips | {width}x{height}, {frames} frames at {flavour.fps} fps |",
        f"| timestep sampling | {cfg.flow.timestep_sampling} |",
        f"| EMA | {'decay ' + format(cfg.ema.decay, 'g') if cfg.ema.use_ema else 'off'} |",
        f"| validation sampler | {settings.scheduler}, shift {settings.flow_shift:g}, {settings.steps} steps, guidance {settings.guidance_scale:g} |",
        "",
    ]
    if videos or contact_sheet:
        lines += ["## Validation preview", ""]
        for path, prompt in videos:
            lines += [f"**{prompt}**", "", f'<video src="{path}" controls autoplay loop muted></video>', ""]
        if contact_sheet:
            lines += [f"![frames of the validation videos]({contact_sheet})", ""]
    body = "\n".join(line for line in lines if line is not None)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
