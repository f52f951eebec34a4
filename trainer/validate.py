"""`wanforge validate`: render the config's validation videos with a saved LoRA, outside training."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.cache import text_embeds
from trainer.components import load_transformer, load_vae
from trainer.config import WanforgeConfig
from trainer.discovery import scan_dataset
from trainer.errors import UserError
from trainer.validation import render, settings_for


def validate_lora(cfg: WanforgeConfig, lora: Path, out_dir: Path | None = None) -> list[Path]:
    from diffusers import WanPipeline

    if not lora.is_file():
        raise UserError(f"--lora {lora}: no such file")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg.model.base_dtype) if cuda else torch.float32
    clips = scan_dataset(cfg.datasets[0]).clips if cfg.validation.prompt is None else []
    settings = settings_for(cfg, clips[0].caption if clips else None)
    prompt, negative = text_embeds(cfg, [settings.prompt, settings.negative_prompt], device)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=load_vae(cfg.model).to(device),
                       scheduler=None, transformer=load_transformer(cfg.model, dtype).to(device))
    try:
        pipe.load_lora_weights(str(lora))
    except (ValueError, KeyError) as err:
        raise UserError(f"--lora {lora}: diffusers could not load it into this model ({err})") from None
    out = out_dir or cfg.train.output_dir / "validation" / "manual"
    return [render(pipe.transformer, pipe.vae, settings, prompt, negative, out, device, dtype if cuda else None)]
