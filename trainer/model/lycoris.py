"""LyCORIS adapters (LoKr, LoHa, LoCon, full) from the lycoris-lora package, and their ComfyUI export.

`lora.lycoris_config` is a JSON file of lycoris.create_lycoris arguments, e.g.
    {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
     "apply_preset": {"target_module": ["WanAttention", "FeedForward"]}}
Without "apply_preset" the adapters go on the modules lora.target_modules names (every block's attention and FFN).
Preset keys a config leaves out take lycoris' defaults (lycoris keeps presets as class state; we reset it per network).

The network is registered as the transformer's `lycoris` submodule, so its parameters train, checkpoint and move with
the transformer. Export (`to_comfyui`, written by trainer.outputs.export): kohya-style keys on the original Wan module names,
which ComfyUI maps for every `diffusion_model.<module>.weight`:
    lora_unet_blocks_0_self_attn_q.lokr_w1 / .lokr_w2 (/ _a / _b), .hada_w1_a ..., .lora_up.weight / .lora_down.weight,
    .diff, .alpha  (ComfyUI's LoKr / LoHa / LoCon / full adapters read these suffixes as lycoris writes them)
The network's `multiplier` scales its output while training; the export multiplies it into one factor of each
module's update, so the file at strength 1.0 gives the trained effect. LoCon files that cover every block's attention
and FFN layers also load in diffusers' load_lora_weights as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.jsonfile import read_lycoris_config

ATTRIBUTE = "lycoris"
PREFIX = "lycoris"  # lycoris' own module prefix: lycoris_<module path with dots as underscores>


def add_lycoris(transformer, config_path: Path, target_modules: list[str], vace_blocks: bool = False):
    """Create the network on the transformer (frozen base, adapter in fp32) and register it as `transformer.lycoris`.
    `vace_blocks`: a VACE model's adapter reaches into its VACE blocks too (else they are left out)."""
    try:
        from lycoris import LycorisNetwork, create_lycoris
    except ImportError:
        raise UserError('lora.lora_type = "lycoris" needs the lycoris-lora package: pip install lycoris-lora') from None

    from trainer.model.lora_names import lycoris_preset, lycoris_preset_defaults

    kwargs = read_lycoris_config(config_path)
    # without apply_preset: the same modules as the LoRA default, every block's attention projections and FFN
    preset = lycoris_preset(kwargs.pop("apply_preset", None), target_modules, vace_blocks)
    transformer.requires_grad_(False)
    try:
        LycorisNetwork.apply_preset({**lycoris_preset_defaults(), **preset, "lora_prefix": PREFIX})
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"lora.lycoris_config: its apply_preset is not a lycoris preset: {err}") from None
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
    from trainer.model.lora_names import original_name

    names = {}
    for path, _ in transformer.named_modules():
        if path.startswith(ATTRIBUTE):
            continue
        names[f"{PREFIX}_{path}".replace(".", "_")] = path
    network = network_of(transformer)
    return {lora.lora_name: original_name(names[lora.lora_name]) for lora in network.loras}


# the tensor each module's update is linear in: scaling it by the multiplier scales the update (first one present)
_STRENGTH_KEYS = {"LoConModule": ("lora_up.weight",), "LohaModule": ("hada_w1_a",),
                  "LokrModule": ("lokr_w1", "lokr_w1_a"), "FullModule": ("diff", "diff_b")}


def _bake_multiplier(module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's tensors (suffix -> tensor) with its multiplier multiplied into the factor its update is linear in."""
    multiplier = float(module.multiplier)
    if multiplier == 1.0:
        return tensors
    kind = module.__class__.__name__
    if kind not in _STRENGTH_KEYS or "dora_scale" in tensors:
        raise UserError(f"lora.lycoris_config: multiplier {multiplier} cannot be baked into a {kind} file"
                        + (" with dora_wd" if "dora_scale" in tensors else "") + ': use "multiplier": 1.0')
    keys = [k for k in _STRENGTH_KEYS[kind] if k in tensors]
    for key in keys if kind == "FullModule" else keys[:1]:
        tensors = {**tensors, key: tensors[key].float() * multiplier}
    return tensors


def to_comfyui(transformer, dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The network's weights (or `state`, a copy of them) with ComfyUI's kohya-style names on the original Wan modules,
    each module's multiplier baked in."""
    network = network_of(transformer)
    originals = _original_names(transformer)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in (state if state is not None else network.state_dict()).items():
        name, _, suffix = key.partition(".")
        by_module.setdefault(name, {})[suffix] = value.detach().to("cpu")
    out = {}
    for lora in network.loras:
        tensors = _bake_multiplier(lora, by_module.get(lora.lora_name, {}))
        original = originals[lora.lora_name].replace(".", "_")
        for suffix, value in tensors.items():
            out[f"lora_unet_{original}.{suffix}"] = value if suffix == "alpha" else value.to(dtype)
    return out
