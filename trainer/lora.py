"""Add a peft LoRA to the Wan transformer: only the adapter trains, and it trains in fp32."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig

from trainer.config import LoraConfig
from trainer.errors import UserError


def add_lora(transformer, cfg: LoraConfig, adapter_name: str = "default") -> None:
    names = [n for n, _ in transformer.named_modules()]
    for target in cfg.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise UserError(
                f'lora.target_modules: "{target}" matches no module of the transformer '
                '(names are diffusers ones, e.g. "attn1.to_q", "attn2.to_out.0", "ffn.net.0.proj")'
            )
    transformer.requires_grad_(False)
    transformer.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.effective_alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            init_lora_weights=True,
        ),
        adapter_name=adapter_name,
    )
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
