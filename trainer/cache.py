"""Build the on-disk caches once: VAE latents (posterior mode, normalised) and UMT5 embeddings at their true length.

Each entry is one safetensors file named by a hash of everything that determines it (file identity, frames, size,
fps, model identity), so a changed clip or model gets a new entry and a second run builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.components import component_id, load_text_encoder, load_tokenizer, load_vae
from trainer.config import DatasetConfig, WanforgeConfig
from trainer.discovery import scan_dataset
from trainer.errors import UserError
from trainer.fileio import temp_path_beside
from trainer.flavours import FLAVOURS
from trainer.video import ClipError, load_clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    latent_path: Path
    text_path: Path
    caption: str
    video: Path


@dataclass
class CacheReport:
    samples: list[list[Sample]] = field(default_factory=list)  # per dataset
    built_latents: int = 0
    built_texts: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def built(self) -> int:
        return self.built_latents + self.built_texts


def cache_root(ds: DatasetConfig) -> Path:
    return ds.cache_dir if ds.cache_dir is not None else ds.path / ".wanforge_cache"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def latent_path(cfg: WanforgeConfig, ds_index: int, video: Path) -> Path:
    ds = cfg.datasets[ds_index]
    frames, height, width = cfg.dataset_shape(ds_index)
    st = video.stat()
    key = _digest(
        [str(video.resolve()), st.st_size, st.st_mtime_ns, frames, height, width,
         FLAVOURS[cfg.model.flavour].fps, component_id(cfg.model, "vae")]
    )
    return cache_root(ds) / "latents" / f"{key}.safetensors"


def text_path(cfg: WanforgeConfig, text: str, ds_index: int = 0) -> Path:
    key = _digest([text, cfg.train.text_max_length, component_id(cfg.model, "text_encoder")])
    return cache_root(cfg.datasets[ds_index]) / "text" / f"{key}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = temp_path_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def normalise_latents(mu: torch.Tensor, vae) -> torch.Tensor:
    """z = (mu - latents_mean) / latents_std, per channel, as the Wan pipeline expects."""
    shape = (1, -1) + (1,) * (mu.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean, dtype=mu.dtype, device=mu.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=mu.dtype, device=mu.device).view(shape)
    return (mu - mean) / std


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[F,H,W,3] uint8 -> normalised latents [C, F', H/8, W/8] (posterior mode)."""
    x = video.permute(3, 0, 1, 2).unsqueeze(0).to(device=device, dtype=vae.dtype) / 127.5 - 1.0
    mu = vae.encode(x).latent_dist.mode()
    return normalise_latents(mu.float(), vae)[0].cpu()


@torch.no_grad()
def encode_text(tokenizer, text_encoder, text: str, max_length: int, device: torch.device) -> torch.Tensor:
    """UMT5 hidden states at their true token length [L, D], tokenised exactly as WanPipeline does."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer(
        [prompt_clean(text)], padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    length = int(tokens.attention_mask.sum())
    hidden = text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
    return hidden[0, :length].float().cpu()


def build_caches(
    cfg: WanforgeConfig, device: torch.device, extra_texts: list[str] = (), show_progress: bool = True
) -> CacheReport:
    """Scan every dataset, encode what is missing, and return the samples that are ready to train on."""
    report = CacheReport()
    todo_videos: list[tuple[int, Path, Path]] = []
    todo_texts: dict[Path, str] = {}
    fps = FLAVOURS[cfg.model.flavour].fps
    for i, ds in enumerate(cfg.datasets):
        scan = scan_dataset(ds, i)
        report.skipped.extend(scan.problems)
        samples = []
        for clip in scan.clips:
            lp, tp = latent_path(cfg, i, clip.video), text_path(cfg, clip.caption, i)
            if not lp.is_file():
                todo_videos.append((i, clip.video, lp))
            if not tp.is_file():
                todo_texts[tp] = clip.caption
            samples.append(Sample(lp, tp, clip.caption, clip.video))
        report.samples.append(samples)
    for text in extra_texts:
        tp = text_path(cfg, text)
        if not tp.is_file():
            todo_texts[tp] = text

    failed: set[Path] = set()
    if todo_videos:
        vae = load_vae(cfg.model, torch.float32).to(device).eval()
        for i, video, lp in tqdm(todo_videos, desc="caching latents", disable=not show_progress):
            frames, height, width = cfg.dataset_shape(i)
            try:
                clip = load_clip(video, frames, height, width, fps)
            except ClipError as err:
                report.skipped.append((video, str(err)))
                failed.add(lp)
                continue
            _save_atomic({"latents": encode_video(vae, clip, device)}, lp)
            report.built_latents += 1
        del vae
    report.built_texts += _encode_texts(cfg, todo_texts, device, show_progress)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    report.samples = [[s for s in samples if s.latent_path not in failed] for samples in report.samples]
    for path, why in report.skipped:
        log.warning("skipped %s: %s", path, why)
    if not any(report.samples):
        raise UserError(
            "no usable clips in " + ", ".join(str(d.path) for d in cfg.datasets)
            + (f" ({len(report.skipped)} skipped: {report.skipped[0][1]}, ...)" if report.skipped else "")
            + ": add video files with same-stem .txt captions"
        )
    return report


def _encode_texts(cfg: WanforgeConfig, todo: dict[Path, str], device: torch.device, show_progress: bool) -> int:
    """Encode and save the texts whose cache files are missing; the encoder is loaded only when needed, then freed."""
    if not todo:
        return 0
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, cfg.model.base_dtype)
    tokenizer = load_tokenizer(cfg.model)
    encoder = load_text_encoder(cfg.model, dtype).to(device).eval()
    for tp, text in tqdm(todo.items(), desc="caching text embeddings", disable=not show_progress):
        _save_atomic({"embeds": encode_text(tokenizer, encoder, text, cfg.train.text_max_length, device)}, tp)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return len(todo)


def text_embeds(cfg: WanforgeConfig, texts: list[str], device: torch.device) -> list[torch.Tensor]:
    """Cached embeddings of texts (validation prompts), encoding the missing ones first."""
    paths = [text_path(cfg, t) for t in texts]
    _encode_texts(cfg, {p: t for p, t in zip(paths, texts) if not p.is_file()}, device, show_progress=False)
    return [load_file(str(p))["embeds"] for p in paths]
