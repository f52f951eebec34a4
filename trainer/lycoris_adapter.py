"""LyCORIS adapters (LoKr, LoHa, LoCon, ...) from the lycoris-lora package, and their ComfyUI export.

`lora.lycoris_config` is a JSON file of lycoris.create_lycoris arguments, e.g.
    {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
     "apply_preset": {"target_module": ["WanAttention", "FeedForward"]}}
Without "apply_preset" the adapters go on the modules lora.target_modules names (every block's attention and FFN).

The network is registered as the transformer's `lycoris` submodule, so its parameters train, checkpoint and move with
the transformer. Export (`to_comfyui`): kohya-style keys on the original Wan module names, which ComfyUI's
model_lora_keys_unet maps for every `diffusion_model.<module>.weight`:
    lora_unet_blocks_0_self_attn_q.lokr_w1 / .lokr_w2 (/ _a / _b), .hada_w1_a ..., .lora_up.weight / .lora_down.weight,
    .alpha  (ComfyUI's LoKr / LoHa / LoCon adapters read these suffixes as lycoris writes them)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.jsonfile import read_lycoris_config

ATTRIBUTE = "lycoris"
PREFIX = "lycoris"  # lycoris' own module prefix: lycoris_<module path with dots as underscores>


def add_lycoris(transformer, config_path: Path, target_modules: list[str]):
    """Create the network on the transformer (frozen base, adapter in fp32) and register it as `transformer.lycoris`."""
    try:
        from lycoris import LycorisNetwork, create_lycoris
    except ImportError:
        raise UserError('lora.lora_type = "lycoris" needs the lycoris-lora package: pip install lycoris-lora') from None

    kwargs = read_lycoris_config(config_path)
    preset = kwargs.pop("apply_preset", None)
    if preset is None:  # the same modules as the LoRA default: every block's attention projections and FFN
        preset = {"target_module": [], "target_name": [rf"^blocks\.\d+\.{t.replace('.', r'.')}$" for t in target_modules]}
    transformer.requires_grad_(False)
    LycorisNetwork.apply_preset({"lora_prefix": PREFIX, **preset})
    try:
        network = create_lycoris(transformer, **kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"lora.lycoris_config: lycoris rejected it: {err}") from None
    if not network.loras:
        raise UserError("lora.lycoris_config: its preset matches no module of the Wan transformer")
    network.apply_to()
    network.float()
    network.requires_grad_(True)
    transformer.add_module(ATTRIBUTE, network)
    return network


def network_of(transformer):
    return getattr(transformer, ATTRIBUTE, None)


def _original_names(transformer) -> dict[str, str]:
    """lycoris module name -> original Wan module path (`blocks.0.self_attn.q`), through the diffusers path."""
    from trainer.export import _to_original

    names = {}
    for path, _ in transformer.named_modules():
        if path.startswith(ATTRIBUTE):
            continue
        names[f"{PREFIX}_{path}".replace(".", "_")] = path
    network = network_of(transformer)
    return {lora.lora_name: _to_original(names[lora.lora_name]) for lora in network.loras}


def to_comfyui(transformer, dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The network's weights (or `state`, a copy of them) with ComfyUI's kohya-style names on the original Wan modules."""
    network = network_of(transformer)
    originals = _original_names(transformer)
    out = {}
    for key, value in (state if state is not None else network.state_dict()).items():
        name, _, suffix = key.partition(".")
        original = originals[name].replace(".", "_")
        value = value.detach().to("cpu")
        out[f"lora_unet_{original}.{suffix}"] = value if suffix == "alpha" else value.to(dtype)
    return out


def save_lycoris(transformer, out_dir: Path, dtype: torch.dtype, info: dict[str, str],
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    from trainer.export import INTERCHANGE_FILE, _save

    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "wanforge": json.dumps({**info, "lora_type": "lycoris"}, sort_keys=True)}
    return _save(to_comfyui(transformer, dtype, state), out_dir / INTERCHANGE_FILE, metadata)
