"""Load the Wan components with diffusers / transformers `from_pretrained`, from a Hub id or a local folder.

The tiny flavours are built locally first (trainer.model.tiny) and then loaded through exactly the same calls.
Wan 2.2 A14B: the flavour's expert comes from `transformer` (high noise) or `transformer_2` (low noise).
VACE flavours load diffusers' WanVACETransformer3DModel (the Wan blocks plus the VACE blocks of the control branch).
Custom finetunes: a transformer override (Hub id / folder + subfolder, or one .safetensors file in the diffusers,
original Wan or ComfyUI layout) and a separate VAE (folder, Hub id or single file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from trainer.config.model import ModelConfig
from trainer.errors import UserError
from trainer.flavours import get_flavour

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_model_path(model: ModelConfig) -> str:
    """Where the pipeline folder is: the config's path, the flavour's Hub id, or the locally built tiny model."""
    if model.pretrained_model_name_or_path:
        return model.pretrained_model_name_or_path
    flavour = get_flavour(model.flavour)
    if flavour.hub_id is None:
        from trainer.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model(flavour.tiny or "t2v-2.1"))
    return flavour.hub_id


def component_id(model: ModelConfig, part: str) -> str:
    """A short stable identity of a component, for cache keys: changing the model invalidates its caches."""
    base = base_model_path(model)
    ident = {"base": base, "revision": model.revision, "part": part}
    if part == "transformer":
        ident["override"] = model.pretrained_transformer_model_name_or_path
        ident["subfolder"] = model.pretrained_transformer_subfolder
    if part == "vae" and model.pretrained_vae_model_name_or_path:
        ident["vae"] = model.pretrained_vae_model_name_or_path
        vae_file = Path(model.pretrained_vae_model_name_or_path)
        if vae_file.is_file():
            ident["vae_file"] = [vae_file.stat().st_size, vae_file.stat().st_mtime_ns]
    local = Path(base) / part / "config.json"
    if local.is_file():  # a local folder: its config content, so a rebuilt model with other weights differs too
        ident["config"] = local.read_text()
        weights = sorted((Path(base) / part).glob("*.safetensors"))
        ident["weights"] = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _friendly(err: Exception, what: str, where: str, field: str | None = None) -> UserError:
    field = field or "model.pretrained_model_name_or_path"
    return UserError(
        f"could not load the {what} from {where}: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"fix: check {field} (a Hub id or a folder in the diffusers layout), "
        "and HF_TOKEN for gated or private repos"
    )


def load_vae(model: ModelConfig, dtype: torch.dtype = torch.float32):
    """The flavour's VAE, or model.pretrained_vae_model_name_or_path: a folder / Hub id (with or without a `vae`
    subfolder) or one file (.safetensors / .pth, original Wan layout, converted by diffusers' from_single_file)."""
    from diffusers import AutoencoderKLWan

    path = base_model_path(model)
    override = model.pretrained_vae_model_name_or_path
    try:
        if override is None:
            return AutoencoderKLWan.from_pretrained(path, subfolder="vae", revision=model.revision, torch_dtype=dtype)
        if Path(override).is_file():
            return AutoencoderKLWan.from_single_file(
                override, config=path, subfolder="vae", revision=model.revision, torch_dtype=dtype
            )
        local = Path(override)
        if local.is_dir():
            sub = "vae" if (local / "vae" / "config.json").is_file() else None
            return AutoencoderKLWan.from_pretrained(override, subfolder=sub, torch_dtype=dtype)
        return AutoencoderKLWan.from_pretrained(override, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise _friendly(err, "VAE", override or path, "model.pretrained_vae_model_name_or_path" if override else None) from None


def load_text_encoder(model: ModelConfig, dtype: torch.dtype = torch.float32):
    from transformers import UMT5EncoderModel

    path = base_model_path(model)
    try:
        return UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", revision=model.revision, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _friendly(err, "text encoder", path) from None


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    path = base_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=model.revision)
    except (OSError, ValueError) as err:
        raise _friendly(err, "tokenizer", path) from None


def load_image_encoder(model: ModelConfig, dtype: torch.dtype = torch.float32):
    """CLIP vision encoder and its image processor (Wan 2.1 I2V), from the base model's folders."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    path = base_model_path(model)
    try:
        encoder = CLIPVisionModel.from_pretrained(path, subfolder="image_encoder", revision=model.revision, dtype=dtype)
        processor = CLIPImageProcessor.from_pretrained(path, subfolder="image_processor", revision=model.revision)
    except (OSError, ValueError) as err:
        raise _friendly(err, "CLIP image encoder", path) from None
    return encoder, processor


def pipeline_boundary(model: ModelConfig) -> float | None:
    """The base model's own Wan 2.2 expert boundary: `boundary_ratio` in its diffusers model_index.json (local folder
    or Hub repo). None when it states none or the file cannot be read (the flavour's value applies then)."""
    base = base_model_path(model)
    local = Path(base) / "model_index.json"
    try:
        if local.is_file():
            text = local.read_text(encoding="utf-8")
        else:
            from huggingface_hub import hf_hub_download

            text = Path(hf_hub_download(base, "model_index.json", revision=model.revision)).read_text(encoding="utf-8")
        value = json.loads(text).get("boundary_ratio")
    except Exception:  # offline, gated, not a diffusers repo...: best effort, the flavour's boundary is the fallback
        return None
    return float(value) if isinstance(value, (int, float)) and 0.0 < float(value) < 1.0 else None


def expert_subfolder(model: ModelConfig, other: bool = False) -> str:
    """The subfolder of the trained transformer (or, with other=True, of the other Wan 2.2 expert)."""
    flavour = get_flavour(model.flavour)
    return flavour.other_expert_subfolder if other else flavour.expert_subfolder


def transformer_class(model: ModelConfig):
    """diffusers' transformer class of the flavour: WanVACETransformer3DModel for VACE, else WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    return WanVACETransformer3DModel if get_flavour(model.flavour).is_vace else WanTransformer3DModel


def load_transformer(model: ModelConfig, dtype: torch.dtype = torch.float32, subfolder: str | None = None):
    """The trained transformer (the flavour's expert), or the override: a Hub id / folder (+ subfolder), or one
    .safetensors file. `subfolder` names another expert of the base model (`transformer` / `transformer_2`)."""
    cls = transformer_class(model)

    base = base_model_path(model)
    override = model.pretrained_transformer_model_name_or_path
    own = expert_subfolder(model)
    if override is None or (subfolder is not None and subfolder != own):
        sub = subfolder or own
        try:
            return cls.from_pretrained(base, subfolder=sub, revision=model.revision, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise _friendly(err, f"transformer ({sub})", base) from None
    if override.endswith(".safetensors"):
        return _transformer_from_file(Path(override), base, own, model.revision, dtype, cls)
    try:
        return cls.from_pretrained(
            override, subfolder=model.pretrained_transformer_subfolder, torch_dtype=dtype
        )
    except (OSError, ValueError) as err:
        raise _friendly(err, "transformer override", override, "model.pretrained_transformer_model_name_or_path") from None


def _transformer_from_file(file: Path, base: str, subfolder: str, revision: str | None, dtype: torch.dtype,
                           cls):
    """One .safetensors file: diffusers keys load into the base config; original Wan keys (bare, or with ComfyUI's
    `model.diffusion_model.` / `diffusion_model.` prefix) go through diffusers' from_single_file conversion. `cls`: the
    flavour's transformer class (transformer_class)."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError(f"model.pretrained_transformer_model_name_or_path: {file} does not exist")
    config = cls.load_config(base, subfolder=subfolder, revision=revision)
    with torch.device("meta"):
        probe = cls.from_config(config)
    expected = set(probe.state_dict())
    state = load_file(str(file))
    if set(state) == expected:
        transformer = cls.from_config(config).to(dtype)
        transformer.load_state_dict(state)
        return transformer
    # diffusers strips `model.diffusion_model.` itself; a bare `diffusion_model.` prefix it doesn't know
    state = {k.removeprefix("diffusion_model."): v for k, v in state.items()}
    try:
        return cls.from_single_file(
            state, config=base, subfolder=subfolder, revision=revision, torch_dtype=dtype
        )
    except Exception as err:  # diffusers raises assorted types for unknown layouts
        missing = sorted(expected - set(state))[:3]
        raise UserError(
            f"model.pretrained_transformer_model_name_or_path: {file} is neither a diffusers transformer state dict "
            f"(missing e.g. {missing}) nor an original Wan checkpoint diffusers can convert ({err.__class__.__name__})"
        ) from None
