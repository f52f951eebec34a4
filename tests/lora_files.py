"""Small LoRA files in the formats users have, for the tiny Wans: original Wan names as ComfyUI writes them (with and
without `.alpha`, with and without the `diffusion_model.` prefix), diffusers names, kohya / musubi names (`lora_unet_`,
lora_down / lora_up, `.alpha`), each with the weight change it must make (`expected_deltas`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.model.lora_names import to_original

FORMATS = ("comfyui", "comfyui-no-alpha", "comfyui-bare", "diffusers", "kohya", "kohya-partial-no-alpha")


def block_linears(shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Every linear layer inside the blocks: the modules a speed LoRA (lightx2v, CausVid) adapts."""
    return [m for m in shapes if m.startswith("blocks.")]


def make_lora(shapes: dict[str, tuple[int, int]], fmt: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
              modules: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(file tensors, {diffusers module: the weight change W' - W at strength 1}) for a random LoRA on `modules`
    (default: every block linear; the partial kohya format takes attention only)."""
    g = torch.Generator().manual_seed(seed)
    modules = modules or block_linears(shapes)
    if fmt == "kohya-partial-no-alpha":
        modules = [m for m in modules if ".attn1." in m]
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    with_alpha = fmt in ("comfyui", "comfyui-bare", "kohya", "diffusers")
    for module in modules:
        fan_in, fan_out = shapes[module]
        down = torch.randn(rank, fan_in, generator=g) * 0.1
        up = torch.randn(fan_out, rank, generator=g) * 0.1
        scale = alpha / rank if with_alpha else 1.0
        deltas[module] = scale * up @ down
        original = to_original(module)
        if fmt.startswith("comfyui"):
            prefix = "" if fmt == "comfyui-bare" else "diffusion_model."
            names = (f"{prefix}{original}.lora_A.weight", f"{prefix}{original}.lora_B.weight", f"{prefix}{original}.alpha")
        elif fmt.startswith("kohya"):
            base = "lora_unet_" + original.replace(".", "_")
            names = (f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha")
        elif fmt == "diffusers":
            names = (f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight",
                     f"transformer.{module}.alpha")
        else:
            raise ValueError(fmt)
        tensors[names[0]], tensors[names[1]] = down, up
        if with_alpha:
            tensors[names[2]] = torch.tensor(alpha)
    return tensors, deltas


def write_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def peft_deltas(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """{module: the weight change the named adapter makes at its current scale}, read from the peft layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}):
            out[name] = m.scaling[adapter] * m.lora_B[adapter].weight.float() @ m.lora_A[adapter].weight.float()
    return out
