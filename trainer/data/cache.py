"""Build the on-disk caches once: VAE latents (posterior mode, normalised) and UMT5 embeddings at their true length.

Each entry is one safetensors file named by a hash of everything that determines it (the file's identity, bucket
size and frames, fps, window start, crop, VAE), and each cache folder has a manifest.json saying which source each
entry came from. A change (a new clip, another resolution for some samples) builds only the entries it changes.
Several processes split the missing entries between them (rank::world_size): no two write one file.
VACE samples keep their control conditioning (trainer.data.vace_inputs) in the same entry, under `vace_context`,
encoded with the same VAE in the same pass; the control files' identity is part of the entry's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from trainer.config.data import DatasetConfig
from trainer.config.schema import WanforgeConfig
from trainer.data.buckets import Bucket, downsample_scale
from trainer.data.conditioning import first_frame_entry
from trainer.data.discovery import Clip, cache_root, scan_dataset, target_fps
from trainer.data.entries import entry_problem
from trainer.data.probe import MediaError
from trainer.data.sources import quarantine
from trainer.data.vace_pairing import ControlFiles
from trainer.data.video import fit_to_size, read_frames_at, read_image, sample_times
from trainer.errors import OutOfMemory, UserError, is_disk_full, is_out_of_memory
from trainer.fileio import atomic_save_safetensors, atomic_write_json, writing_into
from trainer.flavours import get_flavour
from trainer.model.components import component_id, load_text_encoder, load_tokenizer, load_vae
from trainer.model.memory import cudnn_benchmark

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VACE_CACHE_VERSION = "vace-v1"  # how the VACE conditioning is built (trainer.data.vace_inputs): a change renames entries
FAILED_SUFFIX = ".failed"  # beside a latent entry that could not be built: the reason, so a broken file isn't retried


@dataclass(frozen=True)
class Sample:
    latent_path: Path
    text_path: Path
    caption: str
    video: Path
    bucket: str = ""  # "WxH@F": samples of one bucket batch together
    dataset: int = 0
    extra: dict[str, Path] = field(default_factory=dict, compare=False, hash=False)  # more cached tensors per sample


@dataclass
class CacheReport:
    samples: list[list[Sample]] = field(default_factory=list)  # per dataset ([] for a disabled one)
    built_latents: int = 0
    built_texts: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)
    empty_text_path: Path | None = None  # the empty caption's embedding, for caption dropout
    built_conditioning: int = 0  # I2V: image-conditioning entries encoded now (trainer.data.conditioning)

    @property
    def built(self) -> int:
        return self.built_latents + self.built_texts


@dataclass(frozen=True)
class LatentSpec:
    """Everything that determines one latent entry."""

    source: Path
    kind: str  # "video" or "image"
    bucket: Bucket
    fps: float
    start: float  # seconds from the clip's first frame
    crop: bool
    crop_at: tuple[float, float]
    pre_scale: float | None
    control: ControlFiles | None = None  # VACE: the control clip, mask and references (trainer.data.vace_inputs)
    source_width: int = 0  # the clip's width (a control of another resolution gets the same relative crop)

    def identity(self) -> list:
        st = self.source.stat()
        ident = [str(self.source.resolve()), st.st_size, st.st_mtime_ns, self.kind, self.bucket.key, self.fps,
                 round(self.start, 6), self.crop, [round(c, 6) for c in self.crop_at], self.pre_scale]
        return ident + [VACE_CACHE_VERSION, self.control.identity()] if self.control is not None else ident


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _unit_floats(path: Path, n: int) -> list[float]:
    """n numbers in [0, 1) fixed per file: a random crop or window that stays the same across runs (and caches)."""
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}".encode()).digest()
    return [int.from_bytes(h[4 * i : 4 * i + 4], "big") / 2**32 for i in range(n)]


def latent_spec(ds: DatasetConfig, flavour: str, clip: Clip) -> LatentSpec:
    fps = target_fps(ds, flavour)
    u = _unit_floats(clip.video, 3)
    start = 0.0
    if clip.info.kind == "video" and ds.window_start == "random":
        spare = clip.info.frames_at(fps) - clip.bucket.frames
        start = int(u[0] * (spare + 1)) / fps if spare > 0 else 0.0
    crop_at = (u[1], u[2]) if ds.crop_style == "random" else (0.5, 0.5)
    return LatentSpec(clip.video, clip.info.kind, clip.bucket, fps, start, ds.crop, crop_at,
                      downsample_scale(ds, clip.info.width, clip.info.height), clip.control, clip.info.width)


def latent_path(cfg: WanforgeConfig, ds_index: int, spec: LatentSpec) -> Path:
    key = _digest([spec.identity(), component_id(cfg.model, "vae"), cfg.cache.compress_latents])
    return cache_root(cfg.datasets[ds_index]) / "latents" / f"{key}.safetensors"


def text_cache_root(ds: DatasetConfig) -> Path:
    return ds.text_cache_dir if ds.text_cache_dir is not None else cache_root(ds) / "text"


def text_path(cfg: WanforgeConfig, text: str, ds_index: int = 0) -> Path:
    key = _digest([text, cfg.train.text_max_length, component_id(cfg.model, "text_encoder")])
    return text_cache_root(cfg.datasets[ds_index]) / f"{key}.safetensors"


def read_sample(spec: LatentSpec) -> torch.Tensor:
    """The frames of one entry as [F, h, w, 3] uint8, fitted to its bucket; decoding streams (see trainer.data.video)."""
    b = spec.bucket

    def fit(frame):
        return fit_to_size(frame, b.width, b.height, spec.crop, spec.crop_at, spec.pre_scale)

    if spec.kind == "image":
        return torch.from_numpy(read_image(spec.source, fit))
    return torch.from_numpy(read_frames_at(spec.source, sample_times(spec.start, b.frames, spec.fps), fit))


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A cache entry, written under a temp name and renamed (with the user's umask, like every other output)."""
    atomic_save_safetensors(tensors, path)


def latent_shape(cfg: WanforgeConfig, bucket: Bucket) -> tuple[int, ...]:
    """[C, F', H/s, W/s] of a bucket's latents (4 frames and s x s pixels per latent position)."""
    f = get_flavour(cfg.model.flavour)
    return (f.latent_channels, (bucket.frames - 1) // 4 + 1, bucket.height // f.vae_spatial, bucket.width // f.vae_spatial)


def _rebuild_damaged(cfg: WanforgeConfig, latents: list[tuple[Path, LatentSpec]], texts: list[Path]) -> int:
    """Damaged entries among this process's share are named, removed and so built again; returns how many."""
    damaged = 0
    checks = [(lp, {"latents": latent_shape(cfg, spec.bucket)}) for lp, spec in latents if lp.is_file()]
    checks += [(tp, {"embeds": 2}) for tp in texts if tp.is_file()]
    for path, expected in checks:
        why = entry_problem(path, expected)
        if why is not None:
            log.warning("damaged cache entry %s (%s): building it again", path, why)
            path.unlink(missing_ok=True)
            damaged += 1
    return damaged


def normalise_latents(mu: torch.Tensor, vae) -> torch.Tensor:
    """z = (mu - latents_mean) / latents_std, per channel, as the Wan pipeline expects."""
    shape = (1, -1) + (1,) * (mu.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean, dtype=mu.dtype, device=mu.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=mu.dtype, device=mu.device).view(shape)
    return (mu - mean) / std


@torch.no_grad()
def encode_videos(vae, videos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B,F,H,W,3] uint8 -> normalised latents [B, C, F', H/8, W/8] (posterior mode)."""
    x = videos.to(device).permute(0, 4, 1, 2, 3).to(dtype=vae.dtype) / 127.5 - 1.0
    mu = vae.encode(x).latent_dist.mode()
    return normalise_latents(mu.float(), vae).cpu()


def encode_video(vae, video: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[F,H,W,3] uint8 -> normalised latents [C, F', H/8, W/8] (posterior mode)."""
    return encode_videos(vae, video[None], device)[0]


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
    cfg: WanforgeConfig, device: torch.device, extra_texts: list[str] = (), show_progress: bool = True,
    rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
) -> CacheReport:
    """Scan every enabled dataset, encode what is missing (this process's share), and return the samples that are
    ready to train on. With several processes, pass `barrier` (accelerator.wait_for_everyone): every process returns
    the same samples once all shares are built."""
    folders = [f for ds in cfg.datasets if not ds.disabled for f in (cache_root(ds), text_cache_root(ds))]
    with writing_into(folders) as leftovers:
        for path in leftovers:
            log.info("removed %s (left by a killed caching run)", path)
        return _build_caches(cfg, device, extra_texts, show_progress, rank, world_size, barrier)


def _build_caches(cfg: WanforgeConfig, device: torch.device, extra_texts: list[str], show_progress: bool, rank: int,
                  world_size: int, barrier: Callable[[], None] | None) -> CacheReport:
    report = CacheReport()
    latent_entries: dict[Path, LatentSpec] = {}  # every entry in use, built or not
    text_entries: dict[Path, str] = {}
    broken: dict[Path, tuple[int, Path]] = {}  # file -> (dataset, its folder), for delete_problematic
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled:
            report.samples.append([])
            continue
        scan = scan_dataset(ds, i, cfg.model.flavour)
        report.skipped.extend(scan.problems)
        broken.update({p: (i, scan.folder) for p in scan.broken})
        samples = []
        for clip in scan.clips:
            spec = latent_spec(ds, cfg.model.flavour, clip)
            lp, tp = latent_path(cfg, i, spec), text_path(cfg, clip.caption, i)
            latent_entries[lp] = spec
            text_entries[tp] = clip.caption
            samples.append(Sample(lp, tp, clip.caption, clip.video, clip.bucket.key, i))
        report.samples.append(samples)
        for clip in scan.clips:
            broken.setdefault(clip.video, (i, scan.folder))  # decode failures below count as broken files too
    if not any(not ds.disabled for ds in cfg.datasets):
        raise UserError("every dataset has disabled = true: enable at least one [[datasets]] table")
    if any(ds.caption_dropout_probability > 0 for ds in cfg.datasets if not ds.disabled):
        report.empty_text_path = text_path(cfg, "")
        extra_texts = [*extra_texts, ""]
    for text in extra_texts:
        text_entries[text_path(cfg, text)] = text

    # each process owns a fixed share of ALL entries (not of the missing ones, which depend on timing)
    share = sorted(latent_entries.items(), key=lambda item: (item[1].bucket, str(item[0])))[rank::world_size]
    texts = sorted(text_entries.items())[rank::world_size]
    _rebuild_damaged(cfg, share, [tp for tp, _ in texts])
    todo = [(lp, spec) for lp, spec in share if not lp.is_file() and not _failure(lp, spec)]
    report.built_latents = encode_latent_entries(cfg, todo, device, show_progress)
    report.built_texts = _encode_texts(cfg, {tp: t for tp, t in texts if not tp.is_file()}, device, show_progress)
    if barrier is not None:
        barrier()

    ready = []
    for samples in report.samples:
        kept = []
        for s in samples:
            if s.latent_path.is_file():
                kept.append(s)
            else:
                report.skipped.append((s.video, _failure(s.latent_path, latent_entries[s.latent_path])
                                       or "not cached (another process failed on it)"))
        ready.append(kept)
    report.samples = ready
    if get_flavour(cfg.model.flavour).task == "i2v":
        report.built_conditioning = _build_conditioning_share(cfg, ready, device, show_progress, rank, world_size)
        if barrier is not None:
            barrier()  # every process's conditioning share is on disk before anyone trains on it
    if rank == 0:
        _write_manifests(cfg, report)
        report.quarantined = _quarantine(cfg, report.skipped, broken)
    for path, why in report.skipped:  # the callers print the list once (train's bucket report, `wanforge cache`)
        log.info("skipped %s: %s", path, why)
    if not any(report.samples):
        raise UserError(
            "no usable clips in " + ", ".join(str(d.path) for d in cfg.datasets if not d.disabled)
            + (f" ({len(report.skipped)} skipped: {report.skipped[0][1]}, ...)" if report.skipped else "")
            + ": add videos or images with captions (see caption_strategy), or fix the listed files"
        )
    return report


def _build_conditioning_share(cfg: WanforgeConfig, samples: list[list[Sample]], device: torch.device,
                              show_progress: bool, rank: int, world_size: int) -> int:
    """I2V: this process's share of the missing image-conditioning entries (first frame through the VAE, and CLIP
    for Wan 2.1), built from the cached latents like the rest of the caches. Returns how many it encoded."""
    from trainer.data.conditioning import build_conditioning, conditioning_path

    latents = sorted({str(s.latent_path) for group in samples for s in group})[rank::world_size]
    missing = [Path(p) for p in latents if not conditioning_path(cfg, Path(p)).is_file()]
    build_conditioning(cfg, missing, device, show_progress)
    return sum(conditioning_path(cfg, p).is_file() for p in missing)


def _source_identity(spec: LatentSpec) -> list[int] | None:
    try:
        st = spec.source.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _failure(lp: Path, spec: LatentSpec | None = None) -> str | None:
    """Why this entry could not be built, if its source is still the very file that failed (a file fixed since,
    even with its old size and time, is tried again)."""
    marker = lp.with_suffix(FAILED_SUFFIX)
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (spec is not None and record.get("source") != _source_identity(spec)):
        return None
    return str(record.get("why", "could not be decoded"))


def _mark_failed(lp: Path, spec: LatentSpec, why: str) -> None:
    atomic_write_json(lp.with_suffix(FAILED_SUFFIX), {"why": why, "source": _source_identity(spec)})


def _try_read(spec: LatentSpec) -> tuple[torch.Tensor, object] | MediaError:
    """(the clip's frames, its VACE control frames or None), or the MediaError that makes it unusable. Running out of
    memory is no fault of the clip: it is raised (OutOfMemory, naming the size), never recorded against the file."""
    try:
        extra = None
        if spec.control is not None:
            from trainer.data.vace_inputs import read_vace_frames

            extra = read_vace_frames(spec)
        return read_sample(spec), extra
    except MediaError as err:
        return err
    except (OSError, ValueError, RuntimeError, EOFError, MemoryError) as err:  # decoders raise these on damaged files
        if is_out_of_memory(err):
            raise _too_big(spec.bucket, "decoding", "host") from None
        if is_disk_full(err):
            raise
        return MediaError(f"unreadable ({err.__class__.__name__}: {err})")


def _too_big(bucket: Bucket, doing: str, memory: str, batch: int = 1) -> OutOfMemory:
    return OutOfMemory(f"out of {memory} memory {doing} {batch} clip(s) of {bucket.width}x{bucket.height}x"
                       f"{bucket.frames} frames (bucket {bucket.key}): the size is too big for this machine, not a "
                       "fault of the clips: lower the datasets' resolution (or width and height) or num_frames"
                       + (", or set cache.vae_batch_size = 1" if batch > 1 else ""))


def _decoded(todo: list[tuple[Path, LatentSpec]], workers: int) -> Iterator[tuple[Path, tuple | MediaError]]:
    """Decode in order, `workers` threads ahead of the consumer (PyAV and Pillow release the GIL while decoding)."""
    if workers == 0:
        for lp, spec in todo:
            yield lp, _try_read(spec)
        return
    with ThreadPoolExecutor(workers) as pool:
        items = iter(todo)
        window: deque = deque()
        for lp, spec in items:
            window.append((lp, pool.submit(_try_read, spec)))
            if len(window) >= 2 * workers:
                break
        while window:
            lp, future = window.popleft()
            nxt = next(items, None)
            if nxt is not None:
                window.append((nxt[0], pool.submit(_try_read, nxt[1])))
            yield lp, future.result()


def cache_vae_dtype(cfg: WanforgeConfig, device: torch.device) -> torch.dtype:
    """cache.vae_dtype on a GPU; float32 on a CPU (bfloat16 convolutions are slow there)."""
    return getattr(torch, cfg.cache.vae_dtype) if device.type == "cuda" else torch.float32


def encode_latent_entries(cfg: WanforgeConfig, todo: list[tuple[Path, LatentSpec]], device: torch.device,
                    show_progress: bool, vae=None) -> int:
    """Encode clips of one bucket in batches of cache.vae_batch_size; a clip that fails to decode gets a .failed note.
    `vae`: one already loaded (benchmarks); default the config's, in cache.vae_dtype."""
    if not todo:
        return 0
    vae = vae if vae is not None else load_vae(cfg.model, cache_vae_dtype(cfg, device)).to(device).eval()
    store = torch.bfloat16 if cfg.cache.compress_latents else torch.float32
    buckets = {lp: spec.bucket for lp, spec in todo}
    specs = dict(todo)
    pending: list[tuple[Path, torch.Tensor, object]] = []
    built = 0

    def flush() -> int:
        try:
            latents = encode_videos(vae, torch.stack([clip for _, clip, _ in pending]), device)
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise _too_big(buckets[pending[0][0]], "encoding", device.type.upper(), len(pending)) from None
        for (lp, clip, control), z in zip(pending, latents):
            # I2V: the clip's first frame rides along; trainer.data.conditioning builds the image conditioning from it
            entry = {"latents": z.to(store), **first_frame_entry(cfg, clip)}
            if control is not None:  # VACE: the pipeline's control conditioning, encoded by the same VAE
                from trainer.data.vace_inputs import VACE_KEY, vace_context

                entry[VACE_KEY] = vace_context(vae, control, device).to(store)
            _save_atomic(entry, lp)
        n = len(pending)
        pending.clear()
        return n

    with tqdm(total=len(todo), desc="caching latents", unit="clip", disable=not show_progress) as bar, \
            cudnn_benchmark():  # one bucket, one shape: cuDNN's fastest 3D convolutions, timed once
        for lp, decoded in _decoded(todo, cfg.cache.decode_workers):
            if isinstance(decoded, MediaError):
                _mark_failed(lp, specs[lp], str(decoded))
            else:
                if pending and (buckets[pending[0][0]] != buckets[lp] or len(pending) >= cfg.cache.vae_batch_size):
                    built += flush()
                pending.append((lp, *decoded))
            bar.update(1)
        if pending:
            built += flush()
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return built


def _write_manifests(cfg: WanforgeConfig, report: CacheReport) -> None:
    """<cache_dir>/manifest.json: entry -> the source and settings it was built from (for people and tools)."""
    for i, samples in enumerate(report.samples):
        if not samples:
            continue
        entries = {s.latent_path.name: {"source": str(s.video), "bucket": s.bucket, "caption": s.caption,
                                        "text": s.text_path.name} for s in samples}
        try:
            atomic_write_json(cache_root(cfg.datasets[i]) / MANIFEST, entries)
        except OSError as err:
            log.warning("could not write the cache manifest: %s", err)


def _quarantine(cfg: WanforgeConfig, skipped: list[tuple[Path, str]], broken: dict[Path, tuple[int, Path]]) -> list[Path]:
    """delete_problematic: move broken files (not ones merely too short or small for this config) to .quarantine/."""
    moved = []
    for path, why in skipped:
        where = broken.get(path)
        if where is None or not path.is_file():
            continue
        ds = cfg.datasets[where[0]]
        # a clip whose control inputs fail is not itself broken (trainer.data.vace_inputs.CONTROL_FAILURE)
        if ds.delete_problematic and not why.startswith(("too short", "too long", "too small", "control input")):
            moved.append(quarantine(where[1], path, why, ds.caption_extension))
    return moved


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
