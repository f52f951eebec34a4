"""LoRA files: the one writer of every LoRA file a run or `wanforge export` writes, and its save-time self-check.

- Interchange format (the default; native ComfyUI and diffusers' `load_lora_weights` both load it):
  `diffusion_model.<original Wan module>.lora_A.weight` / `.lora_B.weight`, plus a scalar `.alpha` on block modules.
  diffusers' Wan converter reads `.alpha` only for `blocks.N.*`, so for top-level modules (`head.head`,
  `time_embedding.*`, `text_embedding.*`, `time_projection.1`, `img_emb.proj.*`) alpha/rank is folded into lora_A and
  no alpha is written: both loaders then apply exactly the trained update.
- diffusers format: `transformer.<diffusers module>.lora_A.weight`, written by diffusers' own saver.
- VACE blocks: the interchange file names them as the official Wan VACE checkpoints do (`vace_blocks.N.self_attn.q`,
  `vace_blocks.N.before_proj` / `after_proj`; alpha folded), which ComfyUI loads. diffusers' Wan LoRA converter (0.42)
  knows no VACE names and refuses such a file, so a LoRA that reaches VACE blocks is also written in the diffusers
  format beside it (`pytorch_lora_weights.safetensors`, which WanVACEPipeline.load_lora_weights loads as it is).
- LyCORIS (LoKr / LoHa / LoCon / full): kohya-style `lora_unet_<original module>.<suffix>` keys (ComfyUI loads all of
  them; diffusers also loads LoCon files covering every block's attention and FFN, as they are), with the network's
  multiplier baked into the weights so strength 1.0 gives the trained effect.
Before a file is renamed into place, every key must name a module of the original Wan layout and the file must pass
diffusers' own converter in-process; a failure is a bug (LoRAFileError), never a file a user finds broken later.
Torch-free at import.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from trainer.errors import UserError
from trainer.fileio import atomic_save_safetensors, umask_mode
from trainer.model.lora_names import (LoRAFileError, alpha_read_by_diffusers, is_vace_module, original_name, to_diffusers,
                                      to_original)

__all__ = ["save_adapter", "save_lora", "read_lora", "convert_lora", "check_lora_file", "diffusers_lora_source"]

log = logging.getLogger(__name__)
INTERCHANGE_FILE = "wanforge_lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_INTERCHANGE_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")
# kohya-style suffixes ComfyUI's LoRA / LoCon, LoHa, LoKr and full-diff adapters read
LYCORIS_SUFFIXES = {"alpha", "lora_up.weight", "lora_down.weight", "lora_mid.weight", "dora_scale",
                    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b"}


def _diffusers_name(original: str) -> str:
    module = to_diffusers(original)
    if module is None:
        raise UserError(f'"{original}" is not a Wan module this converter knows')
    return module


def to_interchange(peft_state: dict, alpha: float) -> dict:
    """peft/diffusers adapter keys (`blocks.0.attn1.to_q.lora_A.weight`) -> interchange keys, alpha as described above."""
    import torch

    out = {}
    for key, value in peft_state.items():
        m = _LORA_KEY.match(key.removeprefix("transformer."))
        if not m:
            raise UserError(f'unexpected LoRA key "{key}": only lora_A / lora_B weights are exported')
        original = original_name(m["module"])
        if alpha_read_by_diffusers(original):
            out[f"diffusion_model.{original}.alpha"] = torch.tensor(float(alpha))
        elif m["part"] == "lora_A":  # folded: B @ (A * alpha/rank) is the trained update, read the same by both loaders
            value = (value.float() * (float(alpha) / value.shape[0])).to(value.dtype)
        out[f"diffusion_model.{original}.{m['part']}.weight"] = value
    return out


def from_interchange(state: dict) -> tuple[dict, float]:
    """Interchange keys -> (diffusers adapter keys without prefix, alpha). One alpha for the whole file; modules
    written without one (folded) are unfolded to that alpha."""
    weights, alphas, folded = {}, set(), set()
    for key, value in state.items():
        m = _INTERCHANGE_KEY.match(key)
        if not m:
            raise UserError(f'"{key}" is not a LoRA key of the interchange format')
        if m["part"] == "alpha":
            alphas.add(round(float(value), 6))
            continue
        weights[f"{_diffusers_name(m['module'])}.{m['part']}"] = value
        if f"diffusion_model.{m['module']}.alpha" not in state:
            folded.add(_diffusers_name(m["module"]))
    if len(alphas) > 1:
        raise UserError(f"the file has several alphas {sorted(alphas)}: converting it needs one alpha")
    rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
    alpha = alphas.pop() if alphas else float(rank)
    for module in folded:
        a = weights[f"{module}.lora_A.weight"]
        weights[f"{module}.lora_A.weight"] = (a.float() * (a.shape[0] / alpha)).to(a.dtype)
    return weights, alpha


# ---------------------------------------------------------------- the self-check


def _check_vace_names(modules: set[str]) -> None:
    """VACE-block names: diffusers' own single-file converter (how it reads the official Wan VACE checkpoints, and the
    names ComfyUI's VACE model has) must map each one onto the diffusers module we trained."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    for m in modules:
        converted = set(convert_wan_transformer_to_diffusers({f"{m}.weight": None}))
        if converted != {f"{to_diffusers(m)}.weight"}:
            raise LoRAFileError(f'"{m}" is not where diffusers reads the official Wan VACE weights ({converted})')


def _check_interchange(tensors: dict) -> None:
    """Original Wan names with lora_A / lora_B / alpha for ComfyUI, and diffusers' converter gives back the same update
    (VACE-block keys, which diffusers' LoRA converter does not read: checked against its single-file names)."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    modules = set()
    for key, value in tensors.items():
        m = _INTERCHANGE_KEY.match(key)
        if not m or to_diffusers(m["module"]) is None:
            raise LoRAFileError(f'"{key}" is not diffusion_model.<original Wan module>.lora_A/lora_B/alpha')
        if m["part"] == "alpha" and (value.numel() != 1 or not alpha_read_by_diffusers(m["module"])):
            raise LoRAFileError(f'"{key}": diffusers reads a scalar alpha only on block modules')
        modules.add(m["module"])
    vace = {m for m in modules if is_vace_module(m)}
    _check_vace_names(vace)
    modules -= vace
    tensors = {k: v for k, v in tensors.items() if _INTERCHANGE_KEY.match(k)["module"] in modules}
    if not tensors:
        return
    try:  # the converter multiplies some tensors in place: give it float32 copies (the check is about names and scale)
        converted = _convert_non_diffusers_wan_lora_to_diffusers({k: v.float().clone() for k, v in tensors.items()})
    except Exception as err:  # diffusers raises assorted types on keys it leaves over
        raise LoRAFileError(f"diffusers' Wan LoRA converter rejects the file: {err.__class__.__name__}: {err}") from None
    expected = {f"transformer.{to_diffusers(m)}.{p}.weight" for m in modules for p in ("lora_A", "lora_B")}
    if set(converted) != expected:
        raise LoRAFileError(f"diffusers' converter maps the file onto other modules: {sorted(set(converted) ^ expected)[:4]}")
    g = torch.Generator().manual_seed(0)
    for m in modules:
        a, b = (tensors[f"diffusion_model.{m}.{p}.weight"].float() for p in ("lora_A", "lora_B"))
        alpha = tensors.get(f"diffusion_model.{m}.alpha")
        scale = float(alpha) / a.shape[0] if alpha is not None else 1.0
        x = torch.randn(a.shape[1], generator=g)
        mine = b @ (a @ x) * scale
        theirs = (converted[f"transformer.{to_diffusers(m)}.lora_B.weight"].float()
                  @ (converted[f"transformer.{to_diffusers(m)}.lora_A.weight"].float() @ x))
        if not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-6 + 1e-3 * float(mine.abs().max())):
            raise LoRAFileError(f"diffusers would apply another update than the trained one to {m}")


def _check_diffusers(tensors: dict) -> None:
    for key in tensors:
        m = _LORA_KEY.match(key.removeprefix("transformer."))
        if not key.startswith("transformer.") or not m or to_original(m["module"]) is None:
            raise LoRAFileError(f'"{key}" is not transformer.<Wan module with an original name>.lora_A/lora_B.weight')


def kohya_module(name: str) -> str | None:
    """`lora_unet_blocks_0_self_attn_q` -> `blocks.0.self_attn.q` (None if it names no original Wan module)."""
    from trainer.model.lora_names import kohya_to_original

    return kohya_to_original(name)


def _check_lycoris(tensors: dict) -> None:
    """kohya names on original Wan modules for ComfyUI; LoCon files are also tried through diffusers' converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    for key in tensors:
        name, _, suffix = key.partition(".")
        if kohya_module(name) is None or suffix not in LYCORIS_SUFFIXES:
            raise LoRAFileError(f'"{key}" is not lora_unet_<original Wan module>.<LyCORIS suffix ComfyUI reads>')
    if all(k.endswith(("lora_up.weight", "lora_down.weight", ".alpha")) for k in tensors):
        try:
            _convert_musubi_wan_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
        except Exception:  # diffusers reads LoCon only when every block has all its attention and FFN layers
            log.warning("this LoCon file loads in ComfyUI; diffusers' loader reads LoCon files only when they cover "
                        "every block's attention and FFN layers, which this one does not")


def check_lora_file(tensors: dict) -> None:
    """The save-time self-check of a file's tensors (any of the three layouts); raises LoRAFileError."""
    import torch

    if not tensors:
        raise LoRAFileError("the LoRA file would be empty")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LoRAFileError(f"non-finite values in {bad[:3]}: not saved")
    if all(k.startswith("diffusion_model.") for k in tensors):
        return _check_interchange(tensors)
    if all(k.startswith("transformer.") for k in tensors):
        return _check_diffusers(tensors)
    if all(k.startswith("lora_unet_") for k in tensors):
        return _check_lycoris(tensors)
    raise LoRAFileError(f"mixed or unknown key layout: {sorted(tensors)[:3]}")


# ---------------------------------------------------------------- writing


def _save(tensors: dict, path: Path, metadata: dict[str, str]) -> Path:
    """Check, then write atomically (a temp name beside the target, renamed into place, with the user's umask)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    check_lora_file(tensors)
    return atomic_save_safetensors(tensors, path, metadata)


def _save_diffusers(state: dict, out_dir: Path, *, rank: int, alpha: float) -> Path:
    """diffusers' own writer (keys, rank/alpha metadata) into a temp folder; checked, then renamed into place."""
    import tempfile

    from diffusers import WanPipeline
    from safetensors.torch import load_file

    out_dir.mkdir(parents=True, exist_ok=True)
    modules = sorted({_LORA_KEY.match(k)["module"] for k in state})
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-export.") as tmp:
        WanPipeline.save_lora_weights(
            save_directory=tmp,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": modules},
            safe_serialization=True,
        )
        check_lora_file(load_file(str(Path(tmp) / DIFFUSERS_FILE)))
        target = out_dir / DIFFUSERS_FILE
        os.chmod(Path(tmp) / DIFFUSERS_FILE, umask_mode())  # safetensors writes 0600
        (Path(tmp) / DIFFUSERS_FILE).replace(target)
    return target


def _metadata(info: dict[str, str] | None) -> dict[str, str]:
    return {"format": "pt", "wanforge": json.dumps(info or {}, sort_keys=True)}


def save_lora(peft_state: dict, out_dir: Path, *, rank: int, alpha: float, fmt: str = "comfyui", dtype=None,
              info: dict[str, str] | None = None) -> Path:
    """Write a peft adapter to out_dir in the chosen format (dtype: default float32); returns the file."""
    import torch

    from trainer.outputs.finite import require_finite

    state = {k: v.detach().to("cpu", dtype or torch.float32) for k, v in peft_state.items()}
    require_finite(state, f"LoRA for {out_dir}")  # a NaN LoRA is never written (a user error: exit 2)
    if fmt == "comfyui":
        out_dir.mkdir(parents=True, exist_ok=True)
        written = _save(to_interchange(state, alpha), out_dir / INTERCHANGE_FILE, _metadata(info))
        if any(is_vace_module(_LORA_KEY.match(k.removeprefix("transformer."))["module"]) for k in state):
            _save_diffusers(state, out_dir, rank=rank, alpha=alpha)  # diffusers' twin (module docstring)
        return written
    if fmt == "diffusers":
        return _save_diffusers(state, out_dir, rank=rank, alpha=alpha)
    raise UserError(f'unknown LoRA format "{fmt}": use comfyui or diffusers')


def save_lycoris(transformer, out_dir: Path, dtype, info: dict[str, str], state: dict | None = None) -> Path:
    """A LyCORIS network (or `state`, a copy of its tensors) as kohya-style keys ComfyUI loads, multiplier baked in."""
    from trainer.model.lycoris import to_comfyui

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_comfyui(transformer, dtype, state)
    return _save(tensors, out_dir / INTERCHANGE_FILE, _metadata({**info, "lora_type": "lycoris"}))


def save_adapter(transformer, state: dict, out_dir: Path, lora_cfg, info: dict[str, str]) -> Path:
    """The run's final LoRA file for either adapter type (peft LoRA in lora.save_format, or LyCORIS)."""
    import torch

    dtype = getattr(torch, lora_cfg.save_dtype)
    if lora_cfg.lora_type == "lycoris":
        return save_lycoris(transformer, out_dir, dtype, info, state)
    return save_lora(state, out_dir, rank=lora_cfg.rank, alpha=lora_cfg.effective_alpha, fmt=lora_cfg.save_format,
                     dtype=dtype, info=info)


# ---------------------------------------------------------------- reading and `wanforge export`


def read_lora(path: Path) -> tuple[dict, float, dict[str, str]]:
    """Any peft LoRA file this project writes -> (diffusers adapter keys without prefix, alpha, metadata)."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if state and all(k.startswith("diffusion_model.") for k in state):
        weights, alpha = from_interchange(state)
        return weights, alpha, metadata
    if state and all(k.startswith("transformer.") for k in state):
        weights = {k.removeprefix("transformer."): v for k, v in state.items()}
        adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
        return weights, float(adapter.get("transformer.lora_alpha", rank)), metadata
    if any(k.startswith("lora_unet_") for k in state):
        raise UserError(f"{path}: a LyCORIS file (kohya-style lora_unet_* keys): it needs no conversion. ComfyUI's "
                        "LoRA loader reads it as it is, and a LoCon file also loads in diffusers' load_lora_weights as "
                        "it is; LoKr / LoHa files have no diffusers loader")
    raise UserError(f"{path}: neither interchange (diffusion_model.*) nor diffusers (transformer.*) LoRA keys")


def diffusers_lora_source(path: Path):
    """What to give diffusers' load_lora_weights for a LoRA file this project wrote: the file itself, except an
    interchange file with VACE-block keys (diffusers' converter refuses them): its diffusers twin beside it, or where
    that is gone, the file converted in memory (a `transformer.*` state dict)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    vace = any(k.startswith("diffusion_model.") and is_vace_module(k.removeprefix("diffusion_model.")) for k in keys)
    if not vace:
        return str(path)
    twin = path.parent / DIFFUSERS_FILE
    if twin.is_file():
        return str(twin)
    weights, alpha, _ = read_lora(path)
    out = {}
    for key, value in weights.items():  # no adapter metadata travels with a dict: alpha/rank folded into lora_A
        if key.endswith("lora_A.weight"):
            value = (value.float() * (alpha / value.shape[0])).to(value.dtype)
        out[f"transformer.{key}"] = value
    return out


def convert_lora(path: Path, fmt: str, out_dir: Path) -> Path:
    """`wanforge export`: rewrite a saved LoRA in the other format (checked like every file written)."""
    weights, alpha, metadata = read_lora(path)
    rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
    info = json.loads(metadata.get("wanforge", "{}"))
    dtype = next(iter(weights.values())).dtype
    return save_lora(weights, out_dir, rank=rank, alpha=alpha, fmt=fmt, dtype=dtype, info=info)


def save_expert_loras(cfg, run, accelerator, transformer) -> Path:
    """lora/high_noise/ and lora/low_noise/: one LoRA file per expert, each loadable on its own; returns the high one."""
    from trainer.model.lora import adapter_state_dict

    pair = accelerator.unwrap_model(transformer)
    files = {}
    for stage in ("high", "low"):
        state = {k: v.detach().clone() for k, v in adapter_state_dict(pair.expert(stage)).items()}
        info = {"flavour": cfg.model.flavour, "expert": stage, "rank": str(cfg.lora.rank),
                "alpha": str(cfg.lora.effective_alpha), "steps": str(cfg.train.max_train_steps)}
        if accelerator.is_main_process:
            files[stage] = save_adapter(pair.expert(stage), state, run.lora / f"{stage}_noise", cfg.lora, info)
    return files.get("high", run.lora)
