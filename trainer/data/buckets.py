"""Which shape each sample trains at: frame size (multiple of 16) from the pixel target and its aspect, and frame count.

A bucket is one (width, height, frames) shape, named "WxH@F"; a batch only ever holds samples of one bucket. VACE
samples with reference images also bucket by how many they have ("WxH@F+2ref"): the references are latent frames.
Torch-free: `wanforge check` prints the report without loading the trainer's GPU stack.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from trainer.config.data import DatasetConfig
from trainer.data.probe import MediaInfo
from trainer.flavours import Flavour

# aspect_ratio strategy: the shapes most footage comes in (width / height), landscape and portrait
COMMON_ASPECTS = (21 / 9, 2.0, 16 / 9, 3 / 2, 4 / 3, 5 / 4, 1.0, 4 / 5, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 9 / 21)


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    frames: int
    refs: int = 0  # VACE reference images, each one more latent frame before the clip's

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}@{self.frames}" + (f"+{self.refs}ref" if self.refs else "")

    @classmethod
    def parse(cls, key: str) -> Bucket:
        size, rest = key.split("@")
        frames, _, refs = rest.partition("+")
        width, height = size.split("x")
        return cls(int(width), int(height), int(frames), int(refs.removesuffix("ref") or 0))


def size_multiple(flavour: Flavour) -> int:
    """VAE downsampling x patch size: 16 for the Wan 2.1 VAE, 32 for the Wan 2.2 (TI2V) VAE."""
    return getattr(flavour, "vae_spatial", 8) * 2


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def size_in_units(width: float, height: float, resolution_type: str) -> float:
    """A frame's size in the units `resolution` is given in."""
    if resolution_type == "pixel":
        return min(width, height)
    if resolution_type == "area":
        return width * height / 1e6
    return math.sqrt(width * height)


def _target(ds: DatasetConfig, flavour: Flavour) -> float:
    if ds.resolution is not None:
        return ds.resolution
    return size_in_units(flavour.width, flavour.height, ds.resolution_type)


def frame_size(ds: DatasetConfig, flavour: Flavour, src_width: int, src_height: int) -> tuple[int, int]:
    """(width, height) a sample of this source size trains at."""
    if ds.width is not None and ds.height is not None:
        return ds.width, ds.height
    m = size_multiple(flavour)
    aspect = 1.0 if ds.crop_aspect == "square" else src_width / src_height
    if ds.bucket_strategy == "aspect_ratio":
        aspect = min(COMMON_ASPECTS, key=lambda a: abs(math.log(a / aspect)))
    target = _target(ds, flavour)
    if ds.resolution_type == "pixel":
        short = _round_to(target, m)
        long = _round_to(target * max(aspect, 1 / aspect), m)
        return (long, short) if aspect >= 1 else (short, long)
    area = target * target if ds.resolution_type == "pixel_area" else target * 1e6
    if abs(aspect - 1.0) < 1e-9:
        side = _round_to(math.sqrt(area), m)
        return side, side
    # round the shorter edge first, then give the longer edge the rest of the area (832x480 at the Wan 480p area)
    if aspect > 1:
        height = _round_to(math.sqrt(area / aspect), m)
        return _round_to(area / height, m), height
    width = _round_to(math.sqrt(area * aspect), m)
    return width, _round_to(area / width, m)


def frame_count(ds: DatasetConfig, flavour: Flavour, info: MediaInfo, fps: float) -> tuple[int | None, str | None]:
    """(frames to train on, None) or (None, why the clip is skipped)."""
    if info.kind == "image":
        return 1, None
    wanted = ds.num_frames or flavour.num_frames
    available = info.frames_at(fps)
    if ds.max_frames is not None and available > ds.max_frames:
        return None, f"too long: {available} frames at {fps:g} fps, over max_frames {ds.max_frames}"
    frames = wanted if available >= wanted else 1 + (available - 1) // ds.frame_interval * ds.frame_interval
    minimum = min(ds.min_frames or wanted, wanted)
    if available < 1 or frames < minimum:
        return None, (f"too short: {info.duration:.2f}s holds {available} frames at {fps:g} fps, "
                      f"fewer than {minimum} (min_frames; num_frames is {wanted})")
    return frames, None


def downsample_scale(ds: DatasetConfig, width: int, height: int) -> float | None:
    """maximum_image_size / target_downsample_size: the scale large sources get before the bucket-sized crop."""
    if ds.maximum_image_size is None or ds.target_downsample_size is None:
        return None
    size = size_in_units(width, height, ds.resolution_type)
    if size <= ds.maximum_image_size:
        return None
    ratio = ds.target_downsample_size / size
    return math.sqrt(ratio) if ds.resolution_type == "area" else ratio


@dataclass(frozen=True)
class Fit:
    """What fitting a source frame to its bucket costs: the share of the frame kept by the crop (1: all), how much
    the aspect is stretched instead (crop = false; 1: none), and the upscale factor (1 or less: none)."""

    kept: float
    stretch: float
    upscale: float


def fit_of(ds: DatasetConfig, bucket: Bucket, src_width: int, src_height: int) -> Fit:
    """The cost of fitting a source to its bucket, as trainer.data.video.fit_to_size does it (a large source first
    scaled down by maximum_image_size / target_downsample_size)."""
    ratio = (bucket.width / bucket.height) / (src_width / src_height)
    off = min(ratio, 1 / ratio)
    scale = downsample_scale(ds, src_width, src_height) or 1.0
    width, height = src_width * min(scale, 1.0), src_height * min(scale, 1.0)
    if ds.crop:
        upscale = max(bucket.width / width, bucket.height / height)
        return Fit(kept=off, stretch=1.0, upscale=upscale)
    return Fit(kept=1.0, stretch=1 / off, upscale=math.sqrt(bucket.width * bucket.height / (width * height)))


def too_small(ds: DatasetConfig, info: MediaInfo) -> str | None:
    if ds.minimum_image_size is None:
        return None
    size = size_in_units(info.width, info.height, ds.resolution_type)
    if size < ds.minimum_image_size:
        return f"too small: {info.width}x{info.height} is under minimum_image_size {ds.minimum_image_size:g} ({ds.resolution_type})"
    return None


def assign_bucket(ds: DatasetConfig, flavour: Flavour, info: MediaInfo, fps: float) -> tuple[Bucket | None, str | None]:
    """The sample's bucket, or why it can't be used."""
    why = too_small(ds, info)
    if why:
        return None, why
    frames, why = frame_count(ds, flavour, info, fps)
    if frames is None:
        return None, why
    width, height = frame_size(ds, flavour, info.width, info.height)
    return Bucket(width, height, frames), None


@dataclass
class BatchPlan:
    """How many whole batches each dataset's buckets give per epoch, and what is left out."""

    batches: dict[int, dict[str, int]]  # dataset index -> bucket key -> batches per epoch
    samples: dict[int, Counter]  # dataset index -> bucket key -> samples (after repeats)
    dropped: list[tuple[int, str, int]]  # (dataset, bucket, samples) in buckets with fewer samples than one batch

    def total_batches(self) -> int:
        return sum(sum(b.values()) for b in self.batches.values())


def plan_batches(bucket_keys: dict[int, list[str]], repeats: dict[int, int], batch_size: int) -> BatchPlan:
    """bucket_keys: dataset -> one bucket key per usable sample (before repeats)."""
    plan = BatchPlan({}, {}, [])
    for d, keys in bucket_keys.items():
        counts = Counter({k: n * repeats[d] for k, n in Counter(keys).items()})
        plan.samples[d] = counts
        plan.batches[d] = {k: n // batch_size for k, n in counts.items() if n >= batch_size}
        plan.dropped += [(d, k, n) for k, n in sorted(counts.items()) if n < batch_size]
    return plan


def repeats_needed(plan: BatchPlan, d: int, repeats: int, batch_size: int, batches_needed: int) -> int:
    """The smallest repeats that give dataset d at least `batches_needed` whole batches (a search over a monotone
    count, so a huge shortfall costs a few dozen sums, not thousands)."""
    base = [n // repeats for n in plan.samples[d].values()]

    def enough(r: int) -> bool:
        return sum(n * r // batch_size for n in base) >= batches_needed

    if not any(base):
        return repeats
    hi = repeats
    while not enough(hi):
        hi *= 2
    lo = max(repeats, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


def report_lines(names: list[str], plan: BatchPlan, skipped: list[tuple[str, str]], batch_size: int) -> list[str]:
    """The bucket report: samples and batches per bucket per dataset, then every skipped file and why."""
    lines = []
    for d, counts in plan.samples.items():
        total = sum(counts.values())
        lines.append(f"{names[d]}: {total} samples after repeats in {len(counts)} bucket(s)")
        for key in sorted(counts, key=lambda k: Bucket.parse(k)):
            batches = plan.batches[d].get(key, 0)
            note = "" if batches else f"  <- fewer than train_batch_size {batch_size}: not trained"
            lines.append(f"  {key:>16}  {counts[key]:6d} samples  {batches:6d} batches{note}")
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s):")
        lines += [f"  {path}: {why}" for path, why in skipped]
    return lines


def step_problems(plan: BatchPlan, names: list[str], repeats: dict[int, int], batch_size: int, needed: int) -> list[str]:
    """One line per dataset that gives fewer whole batches than one optimizer step needs, with the repeats that fix it."""
    problems = []
    for d in plan.samples:
        have = sum(plan.batches[d].values())
        if have < needed:
            n = sum(plan.samples[d].values())
            fix = repeats_needed(plan, d, repeats[d], batch_size, needed)
            problems.append(
                f"{names[d]} holds {n} samples after repeats in {len(plan.samples[d])} bucket(s), {have} whole "
                f"batch(es) of train_batch_size {batch_size}; one optimizer step needs {needed} "
                f"(gradient_accumulation_steps x GPUs): raise datasets.repeats (datasets[{d}].repeats = {fix}) "
                "or lower train_batch_size"
            )
    return problems
