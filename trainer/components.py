"""Load the Wan components with diffusers / transformers `from_pretrained`, from a Hub id or a local folder.

The tiny flavour is built locally first (trainer.tiny) and then loaded through exactly the same calls.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from trainer.config import ModelConfig
from trainer.errors import UserError
from trainer.flavours import FLAVOURS

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_model_path(model: ModelConfig) -> str:
    """Where the pipeline folder is: the config's path, the flavour's Hub id, or the locally built tiny model."""
    if model.pretrained_model_name_or_path:
        return model.pretrained_model_name_or_path
    flavour = FLAVOURS[model.flavour]
    if flavour.hub_id is None:
        from trainer.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    return flavour.hub_id


def component_id(model: ModelConfig, part: str) -> str:
    """A short stable identity of a component, for cache keys: changing the model invalidates its caches."""
    base = base_model_path(model)
    ident = {"base": base, "revision": model.revision, "part": part}
    if part == "transformer":
        ident["override"] = model.pretrained_transformer_model_name_or_path
    local = Path(base) / part / "config.json"
    if local.is_file():  # a local folder: its config content, so a rebuilt model with other weights differs too
        ident["config"] = local.read_text()
        weights = sorted((Path(base) / part).glob("*.safetensors"))
        ident["weights"] = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _friendly(err: Exception, what: str, where: str) -> UserError:
    return UserError(
        f"could not load the {what} from {where}: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        "fix: check model.pretrained_model_name_or_path (a Hub id or a folder in the diffusers layout), "
        "and HF_TOKEN for gated or private repos"
    )


def load_vae(model: ModelConfig, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLWan

    path = base_model_path(model)
    try:
        return AutoencoderKLWan.from_pretrained(path, subfolder="vae", revision=model.revision, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise _friendly(err, "VAE", path) from None


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


def load_transformer(model: ModelConfig, dtype: torch.dtype = torch.float32):
    """The base transformer, or the override: a Hub id / folder (+ subfolder), or one .safetensors file."""
    from diffusers import WanTransformer3DModel

    base = base_model_path(model)
    override = model.pretrained_transformer_model_name_or_path
    if override is None:
        try:
            return WanTransformer3DModel.from_pretrained(
                base, subfolder="transformer", revision=model.revision, torch_dtype=dtype
            )
        except (OSError, ValueError) as err:
            raise _friendly(err, "transformer", base) from None
    if override.endswith(".safetensors"):
        return _transformer_from_file(Path(override), base, model.revision, dtype)
    try:
        return WanTransformer3DModel.from_pretrained(
            override, subfolder=model.pretrained_transformer_subfolder, torch_dtype=dtype
        )
    except (OSError, ValueError) as err:
        raise _friendly(err, "transformer override", override) from None


def _transformer_from_file(file: Path, base: str, revision: str | None, dtype: torch.dtype):
    """One .safetensors file: diffusers keys load into the base config; original Wan keys go through from_single_file."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError(f"model.pretrained_transformer_model_name_or_path: {file} does not exist")
    config = WanTransformer3DModel.load_config(base, subfolder="transformer", revision=revision)
    with torch.device("meta"):
        probe = WanTransformer3DModel.from_config(config)
    expected = set(probe.state_dict())
    state = load_file(str(file))
    if set(state) == expected:
        transformer = WanTransformer3DModel.from_config(config).to(dtype)
        transformer.load_state_dict(state)
        return transformer
    try:
        return WanTransformer3DModel.from_single_file(
            str(file), config=base, subfolder="transformer", revision=revision, torch_dtype=dtype
        )
    except Exception as err:  # diffusers raises assorted types for unknown layouts
        missing = sorted(expected - set(state))[:3]
        raise UserError(
            f"model.pretrained_transformer_model_name_or_path: {file} is neither a diffusers transformer state dict "
            f"(missing e.g. {missing}) nor an original Wan checkpoint diffusers can convert ({err.__class__.__name__})"
        ) from None
