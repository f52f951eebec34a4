"""LoRA files: the interchange format (native ComfyUI and diffusers both load it) and the diffusers format.

Interchange keys are `diffusion_model.<original Wan module>.lora_A.weight` / `.lora_B.weight` plus a scalar `.alpha`;
diffusers keys are `transformer.<diffusers module>.lora_A.weight`. The module mapping follows diffusers'
WanLoraLoaderMixin conversion, which is what reads these files back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.errors import UserError
from trainer.fileio import atomic_save_safetensors, umask_mode
from trainer.guard import require_finite

INTERCHANGE_FILE = "wanforge_lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

# diffusers module path (inside a block, or top level) -> original Wan module path
_BLOCK_MAP = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_TOP_MAP = {
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_BLOCK = re.compile(r"^blocks\.(?P<n>\d+)\.(?P<rest>.+)$")


def _to_original(module: str) -> str:
    m = _BLOCK.match(module)
    if m and m["rest"] in _BLOCK_MAP:
        return f"blocks.{m['n']}.{_BLOCK_MAP[m['rest']]}"
    if module in _TOP_MAP:
        return _TOP_MAP[module]
    raise UserError(
        f'LoRA module "{module}" has no name in the original Wan layout, so ComfyUI could not load it: '
        'drop it from lora.target_modules or save with lora.save_format = "diffusers"'
    )


def _to_diffusers(module: str) -> str:
    reverse_block = {v: k for k, v in _BLOCK_MAP.items()}
    reverse_top = {v: k for k, v in _TOP_MAP.items()}
    m = _BLOCK.match(module)
    if m and m["rest"] in reverse_block:
        return f"blocks.{m['n']}.{reverse_block[m['rest']]}"
    if module in reverse_top:
        return reverse_top[module]
    raise UserError(f'"{module}" is not a Wan module this converter knows')


def to_interchange(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft/diffusers adapter keys (`blocks.0.attn1.to_q.lora_A.weight`) -> interchange keys with alphas."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        m = _LORA_KEY.match(key.removeprefix("transformer."))
        if not m:
            raise UserError(f'unexpected LoRA key "{key}": only lora_A / lora_B weights are exported')
        original = _to_original(m["module"])
        out[f"diffusion_model.{original}.{m['part']}.weight"] = value
        out[f"diffusion_model.{original}.alpha"] = torch.tensor(float(alpha))
    return out


def from_interchange(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Interchange keys -> (diffusers adapter keys without prefix, alpha). One alpha for the whole file."""
    weights: dict[str, torch.Tensor] = {}
    alphas = set()
    for key, value in state.items():
        body = key.removeprefix("diffusion_model.")
        if body.endswith(".alpha"):
            alphas.add(round(float(value), 6))
            continue
        m = _LORA_KEY.match(body)
        if not m:
            raise UserError(f'"{key}" is not a LoRA weight of the interchange format')
        weights[f"{_to_diffusers(m['module'])}.{m['part']}.weight"] = value
    if len(alphas) > 1:
        raise UserError(f"the file has several alphas {sorted(alphas)}: converting it needs one alpha")
    rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
    return weights, (alphas.pop() if alphas else float(rank))


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    return atomic_save_safetensors(tensors, path, metadata)


def _save_diffusers(state: dict[str, torch.Tensor], out_dir: Path, *, rank: int, alpha: float) -> Path:
    """diffusers' own writer (keys, rank/alpha metadata), into a temp folder, then renamed into place."""
    import tempfile

    from diffusers import WanPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    modules = sorted({_LORA_KEY.match(k)["module"] for k in state})
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-export.") as tmp:
        WanPipeline.save_lora_weights(
            save_directory=tmp,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": modules},
            safe_serialization=True,
        )
        target = out_dir / DIFFUSERS_FILE
        os.chmod(Path(tmp) / DIFFUSERS_FILE, umask_mode())  # safetensors writes 0600
        (Path(tmp) / DIFFUSERS_FILE).replace(target)
    return target


def save_lora(
    peft_state: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    rank: int,
    alpha: float,
    fmt: str = "comfyui",
    dtype: torch.dtype = torch.float32,
    info: dict[str, str] | None = None,
) -> Path:
    """Write the adapter to out_dir in the chosen format; returns the file."""
    state = {k: v.detach().to("cpu", dtype) for k, v in peft_state.items()}
    require_finite(state, f"LoRA for {out_dir}")  # a NaN LoRA is never written
    metadata = {"format": "pt", "wanforge": json.dumps(info or {}, sort_keys=True)}
    if fmt == "comfyui":
        return _save(to_interchange(state, alpha), out_dir / INTERCHANGE_FILE, metadata)
    if fmt == "diffusers":
        return _save_diffusers(state, out_dir, rank=rank, alpha=alpha)
    raise UserError(f'unknown LoRA format "{fmt}": use comfyui or diffusers')


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], float, dict[str, str]]:
    """Any LoRA file this project writes -> (diffusers adapter keys without prefix, alpha, metadata)."""
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if any(k.startswith("diffusion_model.") for k in state):
        weights, alpha = from_interchange(state)
        return weights, alpha, metadata
    if any(k.startswith("transformer.") for k in state):
        weights = {k.removeprefix("transformer."): v for k, v in state.items()}
        adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
        return weights, float(adapter.get("transformer.lora_alpha", rank)), metadata
    if any(k.startswith("lora_unet_") for k in state):
        raise UserError(f"{path}: a LyCORIS file (kohya-style lora_unet_* keys, for ComfyUI): diffusers has no loader "
                        "for it, so it has no other format; load it in ComfyUI as it is")
    raise UserError(f"{path}: neither interchange (diffusion_model.*) nor diffusers (transformer.*) LoRA keys")


def convert_lora(path: Path, fmt: str, out_dir: Path) -> Path:
    """`wanforge export`: rewrite a saved LoRA in the other format."""
    weights, alpha, metadata = read_lora(path)
    rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
    info = json.loads(metadata.get("wanforge", "{}"))
    dtype = next(iter(weights.values())).dtype
    return save_lora(weights, out_dir, rank=rank, alpha=alpha, fmt=fmt, dtype=dtype, info=info)
