"""Scan a dataset: every video and image with its caption, size, length and bucket; what can't be used and why.
VACE datasets also pair each clip with its control inputs (trainer.data.vace_pairing); unpaired or mismatched files
are listed with the reason like every other unusable file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer.config.data import DatasetConfig
from trainer.data.buckets import Bucket, assign_bucket, fit_of, size_in_units, size_multiple
from trainer.data.captions import Captions
from trainer.data.probe import MediaError, MediaInfo, probe
from trainer.data.sources import dataset_folder, list_media
from trainer.data.vace_pairing import ControlFiles, ControlPairing
from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.flavours import FLAVOURS, Flavour

PROBE_FILE = "probe.json"


@dataclass(frozen=True)
class Clip:
    """One usable sample: a video, or an image as a one-frame video."""

    video: Path
    caption: str
    info: MediaInfo | None = None
    bucket: Bucket | None = None
    control: ControlFiles | None = None  # VACE: the control clip, mask and reference images


@dataclass
class Scan:
    folder: Path | None = None
    clips: list[Clip] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it is skipped)
    broken: set[Path] = field(default_factory=set)  # unreadable, empty or uncaptioned (not merely unfit for the config)


def cache_root(ds: DatasetConfig) -> Path:
    return ds.cache_dir if ds.cache_dir is not None else ds.path / ".wanforge_cache"


def target_fps(ds: DatasetConfig, flavour_name: str) -> float:
    return ds.target_fps or FLAVOURS[flavour_name].fps


class ScanMemo:
    """What the scans of one pass share, so a config with thousands of datasets over a few folders lists, captions
    and probes each file once: folder listings, caption readers and probe caches."""

    def __init__(self) -> None:
        self.listings: dict[tuple, tuple[list[Path], list[tuple[Path, str]]]] = {}
        self.captions: dict[tuple, Captions] = {}
        self.probes: dict[Path, _ProbeCache] = {}

    def listing(self, folder: Path, skip: dict[Path, str | None]) -> tuple[list[Path], list[tuple[Path, str]]]:
        key = (str(folder), tuple(sorted((str(p), w or "") for p, w in skip.items())))
        if key not in self.listings:
            self.listings[key] = list_media(folder, skip)
        return self.listings[key]

    def captions_for(self, ds: DatasetConfig, folder: Path, index: int) -> Captions:
        key = (str(folder), ds.caption_strategy, ds.caption_extension, ds.metadata_file, ds.caption_column,
               ds.instance_prompt)
        if key not in self.captions:
            self.captions[key] = Captions(ds, folder, index)
        return self.captions[key]

    def probe_cache(self, path: Path) -> _ProbeCache:
        if path not in self.probes:
            self.probes[path] = _ProbeCache(path)
        return self.probes[path]

    def save(self) -> None:
        for cache in self.probes.values():
            cache.save()


def cache_skips(ds: DatasetConfig, index: int) -> dict[Path, str]:
    """The dataset's own cache folders, which a scan leaves out (folder -> why, as the skipped list says it)."""
    out = {}
    for name in ("cache_dir", "text_cache_dir"):
        folder = getattr(ds, name)
        if folder is not None:
            out[folder] = (f"inside datasets[{index}].{name} ({folder}), which holds the caches and is not scanned: "
                           f"give datasets[{index}].{name} a folder of its own")
    return out


def scan_dataset(ds: DatasetConfig, index: int = 0, flavour: str | None = None, memo: ScanMemo | None = None) -> Scan:
    """With a flavour, every clip also gets its bucket (clips that fit none are problems). Files that can't be used
    (unreadable, uncaptioned, broken links, inside the cache folder) are problems, never exceptions."""
    if flavour is not None and ds.width is not None:
        m = size_multiple(FLAVOURS[flavour])
        if ds.width % m or ds.height % m:
            raise UserError(f"datasets[{index}].width/height: {ds.width}x{ds.height} must be multiples of {m} for "
                            f"{flavour} (its VAE and patch size): try {max(m, ds.width // m * m)}x{max(m, ds.height // m * m)}")
    shared = memo is not None
    memo = memo if memo is not None else ScanMemo()
    folder = dataset_folder(ds, index)
    scan = Scan(folder=folder)
    captions = memo.captions_for(ds, folder, index)
    probes = memo.probe_cache(cache_root(ds) / PROBE_FILE)
    pairing = ControlPairing(ds, folder, index) if ds.has_control else None
    skip: dict[Path, str | None] = dict(cache_skips(ds, index))
    if pairing is not None:  # control, mask and reference folders: other clips' inputs, neither clips nor problems
        skip.update({p: None for p in pairing.skip_folders()})
    files, left_out = memo.listing(folder, skip)
    scan.problems += left_out
    for file in files:
        if pairing is not None and pairing.is_input_file(file):
            continue  # another clip's control, mask or reference (metadata pairing)
        caption, why = captions.caption_for(file)
        if caption is None:
            scan.problems.append((file, why))
            scan.broken.add(file)
            continue
        try:
            info = probes.get(file)
        except MediaError as err:
            scan.problems.append((file, str(err)))
            scan.broken.add(file)
            continue
        bucket = None
        if flavour is not None:
            bucket, why = assign_bucket(ds, FLAVOURS[flavour], info, target_fps(ds, flavour))
            if bucket is None:
                scan.problems.append((file, why))
                continue
        control = None
        if pairing is not None:
            control, why = pairing.pair(file, info, probes.get)
            if control is None:
                scan.problems.append((file, why))
                continue
            bucket = replace(bucket, refs=len(control.references)) if bucket is not None else None
        scan.clips.append(Clip(file, caption, info, bucket, control))
    if pairing is not None:
        scan.problems += pairing.orphans()
    if not shared:
        memo.save()
    return scan


class _ProbeCache:
    """Probe results keyed by path and the file's identity (size, mtime, ctime, inode), so a rescan of a large dataset
    reads only new or changed files. Failures are never kept: a file fixed since (even with its old size and time)
    is read again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            entries = json.loads(path.read_text()) if path.is_file() else {}
        except (ValueError, OSError):
            entries = {}
        self.entries: dict = entries if isinstance(entries, dict) else {}
        self.failed: dict[str, tuple[list[int], str]] = {}  # this pass only
        self.changed = False

    def get(self, file: Path) -> MediaInfo:
        try:
            st = os.stat(file)
        except OSError as err:
            raise MediaError(f"can't be read ({err.strerror or err})") from None
        key = os.path.abspath(file)
        identity = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if key in self.failed and self.failed[key][0] == identity:
            raise MediaError(self.failed[key][1])
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("identity") == identity and "info" in entry:
            try:
                return MediaInfo(**entry["info"])
            except TypeError:
                pass
        try:
            info = probe(file)
        except MediaError as err:
            self.failed[key] = (identity, str(err))
            if self.entries.pop(key, None) is not None:
                self.changed = True
            raise
        except OSError as err:  # vanished or unreadable since it was listed
            self.failed[key] = (identity, f"can't be read ({err.strerror or err})")
            raise MediaError(self.failed[key][1]) from None
        self.entries[key] = {"identity": identity, "info": info.to_dict()}
        self.changed = True
        return info

    def save(self) -> None:
        if self.changed:
            try:
                atomic_write_json(self.path, self.entries)
            except OSError:  # a read-only dataset folder: probing again next time is fine
                pass
            self.changed = False


@dataclass
class DatasetFindings:
    """`wanforge check`'s view of the datasets: the bucket report, problems that stop training, and warnings (legal
    but costly: a crop that throws away much of each frame, sources upscaled to their bucket)."""

    report: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_datasets(cfg, num_processes: int = 1) -> tuple[list[str], list[str]]:
    """(bucket report lines, problems that stop training) from a scan alone, nothing encoded."""
    found = dataset_findings(cfg, num_processes)
    return found.report, found.problems


def dataset_findings(cfg, num_processes: int = 1) -> DatasetFindings:
    """The scan of every enabled dataset, one pass: buckets, what stops training, and what wastes money."""
    from trainer.data.buckets import plan_batches, report_lines, step_problems
    from trainer.model.context_parallel import bucket_problems, data_parallel_size

    found = DatasetFindings()
    keys: dict[int, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    memo = ScanMemo()
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled:
            continue
        try:
            scan = scan_dataset(ds, i, cfg.model.flavour, memo)
        except UserError as err:  # a metadata table that can't be read: this dataset's problem, the others still scan
            found.problems += [line for line in str(err).splitlines() if line.strip()]
            keys[i] = []
            continue
        skipped += [(str(p), why) for p, why in scan.problems]
        keys[i] = [c.bucket.key for c in scan.clips]
        found.warnings += fit_warnings(ds, i, scan.clips, FLAVOURS[cfg.model.flavour])
        if not scan.clips:
            found.problems.append(f"datasets[{i}] ({ds.name}): no usable file in {scan.folder} (see the skipped list)")
    memo.save()
    if not any(not ds.disabled for ds in cfg.datasets):
        found.problems.append("every dataset has disabled = true: enable at least one [[datasets]] table")
    keys = {d: k for d, k in keys.items() if k}
    v = cfg.validation
    if v.eval_every_n_steps and v.eval_holdout and keys.get(0):  # trainer.loop.eval_loss holds these clips out
        held = min(v.eval_samples, len(keys[0]) - 1)
        keys[0] = keys[0][:-held] if held > 0 else keys[0]
    batch = cfg.train.train_batch_size
    repeats = {d: cfg.datasets[d].repeats for d in keys}
    plan = plan_batches(keys, repeats, batch)
    names = [f"datasets[{d}] ({ds.name})" for d, ds in enumerate(cfg.datasets)]
    # whole batches in one optimizer step: one per data-parallel rank (a context-parallel group shares its batches)
    needed = cfg.train.gradient_accumulation_steps * data_parallel_size(cfg, num_processes)
    found.problems += step_problems(plan, names, repeats, batch, needed)
    found.problems += bucket_problems(cfg, keys)
    found.report = report_lines(names, plan, skipped, batch)
    return found


CROP_KEPT_WARN = 0.7  # a crop keeping less of the frame than this throws away much of it
STRETCH_WARN = 1.3  # crop = false: a stretch beyond this visibly distorts
UPSCALE_WARN = 1.2  # sources scaled up more than this train on blur at the bucket's cost


def fit_warnings(ds: DatasetConfig, index: int, clips: list[Clip], flavour: Flavour) -> list[str]:
    """What fitting the clips to their buckets wastes: frame area cropped away, aspect stretched, pixels made up by
    upscaling; one line each with how much, an example and a fix the schema accepts."""
    where, total = f"datasets[{index}]", len(clips)
    fits = [(c, fit_of(ds, c.bucket, c.info.width, c.info.height)) for c in clips if c.bucket is not None]
    out = []
    cropped = [(c, f) for c, f in fits if f.kept < CROP_KEPT_WARN]
    if cropped:
        c, f = min(cropped, key=lambda x: x[1].kept)
        out.append(f"{where}: {len(cropped)} of {total} clips lose up to {1 - f.kept:.0%} of each frame to the crop "
                   f"(e.g. {c.video.name}: {c.info.width}x{c.info.height} cut to the shape of {c.bucket.width}x"
                   f"{c.bucket.height}): {_crop_fix(ds, where, cropped)}")
    stretched = [(c, f) for c, f in fits if f.stretch > STRETCH_WARN]
    if stretched:
        c, f = max(stretched, key=lambda x: x[1].stretch)
        out.append(f"{where}: crop = false stretches {len(stretched)} of {total} clips out of shape by up to "
                   f"{f.stretch:.2g}x (e.g. {c.video.name}: {c.info.width}x{c.info.height} squeezed into "
                   f"{c.bucket.width}x{c.bucket.height}): {_crop_fix(ds, where, stretched)}")
    upscaled = [(c, f) for c, f in fits if f.upscale > UPSCALE_WARN]
    if upscaled:
        c, f = max(upscaled, key=lambda x: x[1].upscale)
        out.append(f"{where}: {len(upscaled)} of {total} clips are smaller than their bucket and are upscaled up to "
                   f"{round(f.upscale, 1):g}x (e.g. {c.video.name}: {c.info.width}x{c.info.height} -> "
                   f"{c.bucket.width}x{c.bucket.height}): each step pays for pixels that hold no detail; "
                   f"{_upscale_fix(ds, where, f.upscale, flavour)}")
    return out


def _crop_fix(ds: DatasetConfig, where: str, hit: list) -> str:
    if ds.crop_aspect == "square":
        return f'set {where}.crop_aspect = "preserve" (buckets that follow each clip\'s shape)'
    if ds.width is not None:
        portrait = ds.height > ds.width
        other_way = sum(c.info.width != c.info.height and (c.info.height > c.info.width) != portrait for c, _ in hit)
        if other_way * 2 > len(hit) and ds.width != ds.height:
            return (f"the clips are {'landscape' if ds.height > ds.width else 'portrait'}: swap the size, "
                    f"{where}.width = {ds.height} and {where}.height = {ds.width}")
        return f"remove {where}.width and {where}.height (buckets then follow each clip's shape)"
    return f'set {where}.bucket_strategy = "resolution_frames" (each clip keeps its own shape)'


def _upscale_fix(ds: DatasetConfig, where: str, factor: float, flavour: Flavour) -> str:
    m = size_multiple(flavour)
    if ds.width is not None:
        w, h = (max(m, int(v / factor) // m * m) for v in (ds.width, ds.height))
        return f"train them smaller, e.g. {where}.width = {w} and {where}.height = {h}"
    target = ds.resolution if ds.resolution is not None else size_in_units(flavour.width, flavour.height,
                                                                           ds.resolution_type)
    lower = target / factor if ds.resolution_type != "area" else target / factor**2
    shown = f"{lower:.2f}".rstrip("0").rstrip(".") if ds.resolution_type == "area" else str(max(m, int(lower)))
    return f"train them smaller, e.g. {where}.resolution = {shown}, or skip them with {where}.minimum_image_size"
