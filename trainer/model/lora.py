"""Add the adapter to the Wan transformer: a peft LoRA, or a LyCORIS network (lora.lora_type = "lycoris",
trainer.model.lycoris). Only the adapter trains, and it trains in fp32. The state-dict helpers below are what
checkpoints and exports use, whichever adapter type it is."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig

from trainer.config.model import LoraConfig
from trainer.errors import UserError


def add_lora(transformer, cfg: LoraConfig, adapter_name: str = "default") -> None:
    """The adapter on the frozen transformer. A VACE model's VACE blocks get it too unless lora.vace_blocks is off."""
    from trainer.model.lora_names import VACE_EXCLUDE, is_vace_module

    vace = hasattr(transformer, "vace_blocks") and cfg.vace_blocks
    names = [n for n, _ in transformer.named_modules() if vace or not is_vace_module(n)]
    for target in cfg.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise UserError(
                f'lora.target_modules: "{target}" matches no module of the transformer '
                '(names are diffusers ones, e.g. "attn1.to_q", "attn2.to_out.0", "ffn.net.0.proj")'
            )
    if cfg.lora_type == "lycoris":
        from trainer.model.lycoris import add_lycoris

        add_lycoris(transformer, cfg.lycoris_config, cfg.target_modules, vace)
        return
    transformer.requires_grad_(False)
    transformer.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.effective_alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            exclude_modules=None if vace or not hasattr(transformer, "vace_blocks") else VACE_EXCLUDE,
            init_lora_weights=True,
        ),
        adapter_name=adapter_name,
    )
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _lycoris(model):
    from trainer.model.lycoris import network_of

    return network_of(model)


def adapter_state_dict(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The trained adapter's tensors (peft keys without the adapter name, or the LyCORIS network's own keys)."""
    if hasattr(model, "adapter_state_dict"):  # trainer.model.experts.ExpertPair: both experts' adapters
        return model.adapter_state_dict()
    network = _lycoris(model)
    if network is not None:
        return network.state_dict()
    from peft.utils import get_peft_model_state_dict

    from trainer.model.sharding import full_tensors

    return full_tensors(get_peft_model_state_dict(model, adapter_name=adapter_name))  # sharded: every rank calls this


def load_adapter_state_dict(model, state: dict[str, torch.Tensor], adapter_name: str = "default") -> list[str]:
    """Load adapter tensors saved by adapter_state_dict; returns the keys the model has no place for."""
    if hasattr(model, "load_adapter_state_dict"):
        return model.load_adapter_state_dict(state)
    network = _lycoris(model)
    if network is not None:
        return list(network.load_state_dict(state, strict=False).unexpected_keys)
    from peft.utils import set_peft_model_state_dict

    return list(set_peft_model_state_dict(model, state, adapter_name=adapter_name).unexpected_keys)
