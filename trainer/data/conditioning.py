"""Image conditioning for I2V and TI2V, built exactly as diffusers' Wan pipelines build it, computed once and cached.

Wan I2V 14B (2.1 and 2.2 A14B), as WanImageToVideoPipeline.prepare_latents: the first frame (VideoProcessor.preprocess,
[-1, 1]) followed by num_frames-1 black (zero) frames is VAE-encoded (posterior mode), normalised per channel, and
preceded by 4 mask channels (1 on the first latent frame, 0 after): a [20, F', h, w] condition concatenated after the
16 noisy channels (36 in). Wan 2.1 I2V also gets CLIP image tokens (encode_image: hidden_states[-2]).
The cache step stores the clip's first frame beside its latents (`first_frame`), and this module turns it into one
`conditioning/<key>.safetensors` per sample, so the VAE / CLIP never run during training.

TI2V-5B, as the pipelines' expand_timesteps path: the first latent frame is the clean latent of the first frame (the
Wan VAE is causal: it equals the encoded image alone, so it is taken from the cached latents), its tokens get timestep
0, and it is left out of the loss.

VACE: the control conditioning rides in the latent entry (trainer.data.vace_inputs, built in the latent pass) and is
fed to the transformer as control_hidden_states, at full strength on every VACE layer (the pipeline's default
conditioning_scale 1.0).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from trainer.config.model import ModelConfig
from trainer.config.schema import WanforgeConfig
from trainer.data.entries import entry_problem
from trainer.fileio import atomic_save_safetensors
from trainer.flavours import Flavour, get_flavour

log = logging.getLogger(__name__)

MASK_CHANNELS = 4  # the VAE's temporal factor: one mask channel per frame folded into a latent frame
CONDITIONING_VERSION = "i2v-v1"


def wants_first_frame(cfg: WanforgeConfig) -> bool:
    """Whether the cache step keeps each clip's first frame (I2V builds its conditioning from it)."""
    return get_flavour(cfg.model.flavour).task == "i2v"


def first_frame_entry(cfg: WanforgeConfig, clip: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extra tensors for a latent cache entry: the first frame [H, W, 3] uint8 for I2V flavours, else nothing."""
    return {"first_frame": clip[0].contiguous()} if wants_first_frame(cfg) else {}


# ---------------------------------------------------------------- building the I2V conditioning


def _pil(frame: torch.Tensor):
    from PIL import Image

    return Image.fromarray(frame.cpu().numpy())


@torch.no_grad()
def i2v_condition(vae, image, num_frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """[1, 4 + z, F', h, w] for one PIL image, in the operations and order of WanImageToVideoPipeline.prepare_latents
    (written out because that method also draws the noise latents and needs a whole pipeline)."""
    from diffusers.video_processor import VideoProcessor

    scale_t, scale_s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    pixels = VideoProcessor(vae_scale_factor=scale_s).preprocess(image, height=height, width=width)
    pixels = pixels.to(device, dtype=torch.float32).unsqueeze(2)
    video = torch.cat([pixels, pixels.new_zeros(1, pixels.shape[1], num_frames - 1, height, width)], dim=2)
    latent = vae.encode(video.to(device=device, dtype=vae.dtype)).latent_dist.mode()
    latent = latent.to(device=device, dtype=torch.float32)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(device, torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(device, torch.float32)
    latent = (latent - mean) * inv_std
    # the first frame is given: the pipeline folds a per-frame mask 4 frames per latent frame, i.e. all 4 mask
    # channels are 1 on the first latent frame and 0 after
    assert scale_t == MASK_CHANNELS, "the Wan VAE folds 4 frames into one latent frame"
    mask = torch.zeros(1, MASK_CHANNELS, latent.shape[2], height // scale_s, width // scale_s, device=device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)


@torch.no_grad()
def clip_image_embeds(image_encoder, image_processor, image, device: torch.device) -> torch.Tensor:
    """[1, tokens, dim]: WanImageToVideoPipeline.encode_image (CLIP penultimate hidden states)."""
    inputs = image_processor(images=image, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(image_encoder.dtype)
    return image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]


def conditioning_path(cfg: WanforgeConfig, latent_path: Path) -> Path:
    from trainer.model.components import component_id

    flavour = get_flavour(cfg.model.flavour)
    ident = [latent_path.name, CONDITIONING_VERSION, component_id(cfg.model, "vae")]
    if flavour.image_encoder:
        ident.append(component_id(cfg.model, "image_encoder"))
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
    return latent_path.parent.parent / "conditioning" / f"{key}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_save_safetensors(tensors, path)  # temp name, rename, the user's umask


def _usable(path: Path) -> bool:
    """An entry that exists and reads; a damaged one is named and removed, so it is built again."""
    if not path.is_file():
        return False
    why = entry_problem(path, {"condition": 4})
    if why is not None:
        log.warning("damaged cache entry %s (%s): building it again", path, why)
        path.unlink(missing_ok=True)
    return why is None


def _read_first_frame(latent_path: Path) -> tuple[torch.Tensor, int]:
    with safe_open(str(latent_path), framework="pt") as f:
        if "first_frame" not in f.keys():
            raise KeyError(latent_path)
        return f.get_tensor("first_frame"), f.get_slice("latents").get_shape()[1]


def build_conditioning(cfg: WanforgeConfig, latent_paths: list[Path], device: torch.device,
                       show_progress: bool = True) -> dict[Path, Path]:
    """I2V: encode the missing conditioning entries (VAE, and CLIP for 2.1) and return latent path -> entry path.
    Other flavours need no cache: returns {}."""
    flavour = get_flavour(cfg.model.flavour)
    if flavour.task != "i2v":
        return {}
    from trainer.model.components import load_image_encoder, load_vae

    paths = {lp: conditioning_path(cfg, lp) for lp in dict.fromkeys(latent_paths)}
    todo = [(lp, cp) for lp, cp in paths.items() if not _usable(cp)]
    if not todo:
        return paths
    vae = load_vae(cfg.model, torch.float32).to(device).eval()
    encoder = processor = None
    if flavour.image_encoder:
        encoder, processor = load_image_encoder(cfg.model, torch.float32)
        encoder = encoder.to(device).eval()
    for lp, cp in tqdm(todo, desc="caching image conditioning", disable=not show_progress):
        try:
            frame, latent_frames = _read_first_frame(lp)
        except KeyError:
            lp.unlink(missing_ok=True)  # an entry from before I2V: rebuilt with its first frame on the next run
            from trainer.errors import UserError

            raise UserError(
                f"{lp} was cached without the first frame image-to-video needs; it has been removed: run again "
                "(only the removed entries are re-encoded)"
            ) from None
        height, width = frame.shape[0], frame.shape[1]
        num_frames = (latent_frames - 1) * vae.config.scale_factor_temporal + 1
        image = _pil(frame)
        tensors = {"condition": i2v_condition(vae, image, num_frames, height, width, device)[0].cpu()}
        if encoder is not None:
            tensors["image_embeds"] = clip_image_embeds(encoder, processor, image, device)[0].float().cpu()
        _save_atomic(tensors, cp)
    del vae, encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return paths


# ---------------------------------------------------------------- dataset hook


class ConditionedDataset(torch.utils.data.Dataset):
    """Adds each sample's cached conditioning tensors to the base dataset's items (I2V)."""

    def __init__(self, base, paths: dict[Path, Path]):
        self.base, self.paths = base, paths

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.base[index]
        item.update(load_file(str(self.paths[self.base.samples[index].latent_path])))
        return item


class ConditionedCollate:
    """The base collate for latents/text, plus a stack of the conditioning tensors."""

    KEYS = ("condition", "image_embeds")

    def __init__(self, base):
        self.base = base

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        extra = {k: torch.stack([it.pop(k) for it in items]) for k in self.KEYS if k in items[0]}
        for it in items:
            it.pop("first_frame", None)
        out = self.base(items)
        out.update(extra)
        return out


def with_conditioning(dataset, collate, paths: dict[Path, Path]):
    """(dataset, collate) for the loader: unchanged when the flavour has no cached conditioning."""
    if not paths:
        return dataset, collate
    return ConditionedDataset(dataset, paths), ConditionedCollate(collate)


# ---------------------------------------------------------------- the training forward's inputs


def ti2v_first_frame_mask(latents: torch.Tensor) -> torch.Tensor:
    """[1, 1, F', h, w]: 0 on the first latent frame (given), 1 elsewhere, as the pipelines' first_frame_mask."""
    mask = torch.ones(1, 1, *latents.shape[2:], dtype=latents.dtype, device=latents.device)
    mask[:, :, 0] = 0
    return mask


def transformer_inputs(flavour: Flavour, model: ModelConfig, batch: dict[str, torch.Tensor], latents: torch.Tensor,
                       noisy: torch.Tensor, timesteps: torch.Tensor, device, dtype, patch_size=(1, 2, 2)) -> dict:
    """hidden_states / timestep (/ encoder_hidden_states_image, control_hidden_states) for the transformer, as the
    flavour's pipeline feeds it at inference: I2V concatenates the cached condition, TI2V pins the clean first frame at
    timestep 0, VACE adds the cached control conditioning."""
    if flavour.task == "vace":
        from trainer.data.vace_inputs import VACE_KEY

        control = batch[VACE_KEY].to(device, non_blocking=True).to(dtype)
        return {"hidden_states": noisy.to(dtype), "timestep": timesteps, "control_hidden_states": control}
    if flavour.task == "i2v":
        condition = batch["condition"].to(device, non_blocking=True).float()
        inputs = {"hidden_states": torch.cat([noisy, condition], dim=1).to(dtype), "timestep": timesteps}
        if "image_embeds" in batch:
            inputs["encoder_hidden_states_image"] = batch["image_embeds"].to(device, non_blocking=True).to(dtype)
        return inputs
    if flavour.task == "ti2v":
        mask = ti2v_first_frame_mask(latents)
        hidden = ((1 - mask) * latents + mask * noisy).to(dtype)
        if model.wan_force_2_1_time_embedding:
            return {"hidden_states": hidden, "timestep": timesteps}
        _, ph, pw = patch_size
        per_token = mask[0, 0][:, ::ph, ::pw].flatten()  # one entry per patch token, first frame 0
        return {"hidden_states": hidden, "timestep": per_token.unsqueeze(0) * timesteps.view(-1, 1)}
    return {"hidden_states": noisy.to(dtype), "timestep": timesteps}


def loss_region(flavour: Flavour, prediction: torch.Tensor, target: torch.Tensor):
    """TI2V: the given first latent frame is left out of the loss; every other flavour uses the whole latent."""
    if flavour.task == "ti2v":
        return prediction[:, :, 1:], target[:, :, 1:]
    return prediction, target
