"""CREPA: align one transformer block's hidden states with frozen DINOv2 features of the same and neighbouring frames.

Where the features come from: the clean cached latents of the batch are DECODED with the frozen Wan VAE each step
(no gradient), and one pixel frame per latent frame goes through the encoder: frame 0 for latent frame 0, frame 4j
for latent frame j (the last frame of the four it compresses). So CREPA works from the latent cache as it is, at
the price of one VAE decode and F' encoder images per sample per step (21 at 81 frames), and of the VAE and the
encoder staying in GPU memory (vitg14: ~2.3 GB in bf16; vits14: ~50 MB).

Loss: the block output goes through a small head (LayerNorm + Linear, trained with the LoRA, not saved in it) to the
encoder's width; encoder patch tokens are resampled to the transformer's token grid; for latent frame f and offset d
in -D..D the cosine similarity of head(h_f) and y_{f+d}, averaged over tokens, weighs 1 for d = 0 and
exp(-|d| / temporal_decay) otherwise; the weighted mean over the valid neighbours, averaged over frames and samples,
is the alignment score, and the loss is weight x (1 - score). With TREAD routing the captured block, tokens routed
around it are taken at their route-start values (what the model carries for them there).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config.training import CrepaConfig
from trainer.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_REPO = "facebookresearch/dinov2"


class FrameEncoder(torch.nn.Module):
    """A frozen DINOv2 (torch hub or transformers layout): frames in [0, 1] -> patch tokens [N, gh, gw, C]."""

    def __init__(self, model: torch.nn.Module, kind: str, image_size: int, width: int):
        super().__init__()
        self.model, self.kind, self.image_size, self.width = model.eval().requires_grad_(False), kind, image_size, width
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(frames.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        if self.kind == "hub":
            tokens = self.model.forward_features(x)["x_norm_patchtokens"]
        else:
            tokens = self.model(pixel_values=x).last_hidden_state[:, 1:]  # drop CLS; already layer-normed
        grid = self.image_size // 14
        return tokens.float().reshape(frames.shape[0], grid, grid, -1)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "WANFORGE_OFFLINE"))


def load_encoder(cfg: CrepaConfig, device: torch.device, dtype: torch.dtype) -> FrameEncoder:
    """The encoder from crepa.encoder_path (local) or torch hub, with one clear line when it can't be had."""
    if cfg.encoder_path:
        path = Path(cfg.encoder_path)
        if (path / "hubconf.py").is_file():
            model = _hub_load(str(path), cfg.encoder, source="local")
            return FrameEncoder(model, "hub", cfg.encoder_image_size, model.embed_dim).to(device, dtype)
        if (path / "config.json").is_file():
            from transformers import Dinov2Model

            model = Dinov2Model.from_pretrained(str(path), dtype=dtype)
            return FrameEncoder(model, "transformers", cfg.encoder_image_size, model.config.hidden_size).to(device, dtype)
        raise UserError(f"crepa.encoder_path: {path} is neither a dinov2 repo clone (hubconf.py) nor a transformers "
                        "Dinov2 folder (config.json): point it at one of them")
    hub_code = Path(torch.hub.get_dir()) / (HUB_REPO.replace("/", "_") + "_main")
    if _offline() and not hub_code.is_dir():
        raise UserError(f"crepa: {cfg.encoder} is not in the torch hub cache ({hub_code}) and this run is offline: "
                        "download it once online, or set crepa.encoder_path to a local dinov2 clone or Dinov2 folder")
    model = _hub_load(HUB_REPO, cfg.encoder, source="github")
    return FrameEncoder(model, "hub", cfg.encoder_image_size, model.embed_dim).to(device, dtype)


def _hub_load(repo: str, name: str, source: str) -> torch.nn.Module:
    try:
        return torch.hub.load(repo, name, source=source, trust_repo=True, skip_validation=True)
    except Exception as err:  # torch hub raises URLError, HTTPError, RuntimeError, ... for an unreachable model
        raise UserError(f"crepa: could not load {name} from {repo} ({err.__class__.__name__}: {str(err)[:200]}): "
                        "check the network, or set crepa.encoder_path to a local dinov2 clone or Dinov2 folder") from None


class CrepaHead(torch.nn.Module):
    """Projects transformer hidden states to the encoder's feature width (trained, fp32)."""

    def __init__(self, dim: int, encoder_width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.proj = torch.nn.Linear(dim, encoder_width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden.float()))


def neighbour_weights(distance: int, decay: float) -> dict[int, float]:
    return {d: (1.0 if d == 0 else math.exp(-abs(d) / decay)) for d in range(-distance, distance + 1)}


def alignment_score(projected: torch.Tensor, features: torch.Tensor, distance: int, decay: float) -> torch.Tensor:
    """projected, features: [B, F, T, C] (frames x tokens). Weighted cosine similarity over neighbours, in [-1, 1]."""
    p = F.normalize(projected.float(), dim=-1)
    y = F.normalize(features.float(), dim=-1)
    frames = p.shape[1]
    total = p.new_zeros(p.shape[0], frames)
    norm = p.new_zeros(frames)
    for d, w in neighbour_weights(distance, decay).items():
        lo, hi = max(0, -d), min(frames, frames - d)
        if lo >= hi:
            continue
        sim = (p[:, lo:hi] * y[:, lo + d:hi + d]).sum(-1).mean(-1)  # [B, hi-lo]
        total[:, lo:hi] += w * sim
        norm[lo:hi] += w
    return (total / norm).mean()


def frames_for_latents(pixels: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """[B, 3, F, H, W] decoded video -> [B, F', 3, H, W]: pixel frame 4j for latent frame j (0 for the first)."""
    index = torch.tensor([min(4 * j, pixels.shape[2] - 1) for j in range(latent_frames)], device=pixels.device)
    return pixels.index_select(2, index).transpose(1, 2)


def denormalise_latents(z: torch.Tensor, vae) -> torch.Tensor:
    shape = (1, -1) + (1,) * (z.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
    return z * std + mean


class Crepa:
    """Captures block `block_index` in training forwards and turns it into the CREPA loss for the same batch."""

    def __init__(self, transformer, cfg: CrepaConfig, encoder: FrameEncoder, vae, router=None,
                 device: torch.device | None = None):
        from trainer.loop.tread import block_lists

        lists = block_lists(transformer)  # both experts of a Wan 2.2 A14B pair: only the active one runs
        if cfg.block_index >= len(lists[0]):
            raise UserError(f"crepa.block_index = {cfg.block_index}: the model has blocks 0..{len(lists[0]) - 1}")
        self.cfg, self.encoder, self.vae, self.router = cfg, encoder, vae, router
        self.patch = tuple(transformer.config.patch_size)
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        device = device or next(transformer.parameters()).device
        # A submodule of the transformer: its parameters join the LoRA's in the optimizer (and under DDP).
        transformer.crepa_head = CrepaHead(dim, encoder.width).to(device)
        self.head = transformer.crepa_head
        self._captured: torch.Tensor | None = None
        self._handles = [blocks[cfg.block_index].register_forward_hook(self._capture) for blocks in lists]
        self.last_score: float | None = None

    def _capture(self, module, args, output):
        if torch.is_grad_enabled() and self._captured is None:  # the first forward, not a checkpoint recompute
            self._captured = output

    def reset(self) -> None:
        self._captured = None

    @torch.no_grad()
    def target_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents [B, C, F', H, W] -> encoder features on the token grid [B, F', h*w, C_enc]."""
        b, _, frames, height, width = latents.shape
        vae_dtype = next(self.vae.parameters()).dtype
        pixels = self.vae.decode(denormalise_latents(latents.to(vae_dtype), self.vae), return_dict=False)[0]
        images = frames_for_latents((pixels.float().clamp(-1, 1) + 1) / 2, frames).flatten(0, 1)
        tokens = self.encoder(images)  # [B*F', gh, gw, C]
        h, w = height // self.patch[1], width // self.patch[2]
        grid = F.interpolate(tokens.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(b, frames, h * w, -1)

    def loss(self, latents: torch.Tensor) -> torch.Tensor:
        """The weighted CREPA loss for the forward just run on `latents` (its hidden states were captured)."""
        if self._captured is None:
            raise RuntimeError("CREPA: no hidden states were captured (the transformer did not run with gradients)")
        hidden = self._captured
        self._captured = None
        if self.router is not None:
            hidden = self.router.full_tokens(self.cfg.block_index, hidden)
        b, _, frames, height, width = latents.shape
        p_t = self.patch[0]
        projected = self.head(hidden).reshape(b, frames // p_t, -1, self.encoder.width)
        features = self.target_features(latents)
        score = alignment_score(projected, features, self.cfg.adjacent_distance, self.cfg.temporal_decay)
        self.last_score = float(score.detach())
        return self.cfg.weight * (1.0 - score)


def install_crepa(transformer, cfg: CrepaConfig, model_cfg, device: torch.device, dtype: torch.dtype, router=None) -> Crepa | None:
    """Load the frozen encoder and VAE and attach the head and the capture hook; None when CREPA is off."""
    if not cfg.enabled:
        return None
    from trainer.model.components import load_vae

    encoder = load_encoder(cfg, device, dtype)
    vae = load_vae(model_cfg, dtype).to(device).eval().requires_grad_(False)
    return Crepa(transformer, cfg, encoder, vae, router, device)
