"""Scan a dataset: every video and image with its caption, size, length and bucket; what can't be used and why.
VACE datasets also pair each clip with its control inputs (trainer.data.vace_pairing); unpaired or mismatched files
are listed with the reason like every other unusable file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer.config.data import DatasetConfig
from trainer.data.buckets import Bucket, assign_bucket, size_multiple
from trainer.data.captions import Captions
from trainer.data.probe import MediaError, MediaInfo, probe
from trainer.data.sources import dataset_folder, list_media
from trainer.data.vace_pairing import ControlFiles, ControlPairing
from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.flavours import FLAVOURS

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


def scan_dataset(ds: DatasetConfig, index: int = 0, flavour: str | None = None) -> Scan:
    """With a flavour, every clip also gets its bucket (clips that fit none are problems)."""
    if flavour is not None and ds.width is not None:
        m = size_multiple(FLAVOURS[flavour])
        if ds.width % m or ds.height % m:
            raise UserError(f"datasets[{index}].width/height: {ds.width}x{ds.height} must be multiples of {m} for "
                            f"{flavour} (its VAE and patch size): try {max(m, ds.width // m * m)}x{max(m, ds.height // m * m)}")
    folder = dataset_folder(ds, index)
    scan = Scan(folder=folder)
    captions = Captions(ds, folder, index)
    probes = _ProbeCache(cache_root(ds) / PROBE_FILE)
    pairing = ControlPairing(ds, folder, index) if ds.has_control else None
    skip = tuple(p for p in (ds.cache_dir, ds.text_cache_dir) if p is not None)
    skip += pairing.skip_folders() if pairing is not None else ()
    for file in list_media(folder, skip):
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
    probes.save()
    return scan


class _ProbeCache:
    """Probe results keyed by path, size and mtime, so a rescan of a large dataset reads only new or changed files."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, OSError):
            self.entries = {}
        self.changed = False

    def get(self, file: Path) -> MediaInfo:
        st = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            if "error" in entry:
                raise MediaError(entry["error"])
            return MediaInfo(**entry["info"])
        self.changed = True
        record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            info = probe(file)
        except MediaError as err:
            self.entries[key] = {**record, "error": str(err)}
            raise
        self.entries[key] = {**record, "info": info.to_dict()}
        return info

    def save(self) -> None:
        if self.changed:
            try:
                atomic_write_json(self.path, self.entries)
            except OSError:  # a read-only dataset folder: probing again next time is fine
                pass


def check_datasets(cfg, num_processes: int = 1) -> tuple[list[str], list[str]]:
    """`wanforge check`: (bucket report lines, problems that stop training) from a scan alone, nothing encoded."""
    from trainer.data.buckets import plan_batches, report_lines, step_problems
    from trainer.model.context_parallel import bucket_problems, data_parallel_size

    keys: dict[int, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    problems: list[str] = []
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled:
            continue
        scan = scan_dataset(ds, i, cfg.model.flavour)
        skipped += [(str(p), why) for p, why in scan.problems]
        keys[i] = [c.bucket.key for c in scan.clips]
        if not scan.clips:
            problems.append(f"datasets[{i}] ({ds.name}): no usable file in {scan.folder} (see the skipped list)")
    if not keys:
        problems.append("every dataset has disabled = true: enable at least one [[datasets]] table")
    v = cfg.validation
    if v.eval_every_n_steps and v.eval_holdout and keys.get(0):  # trainer.loop.eval_loss holds these clips out
        held = min(v.eval_samples, len(keys[0]) - 1)
        keys[0] = keys[0][:-held] if held > 0 else keys[0]
    batch = cfg.train.train_batch_size
    repeats = {d: cfg.datasets[d].repeats for d in keys}
    plan = plan_batches({d: k for d, k in keys.items() if k}, repeats, batch)
    names = [f"datasets[{d}] ({ds.name})" for d, ds in enumerate(cfg.datasets)]
    # whole batches in one optimizer step: one per data-parallel rank (a context-parallel group shares its batches)
    needed = cfg.train.gradient_accumulation_steps * data_parallel_size(cfg, num_processes)
    problems += step_problems(plan, names, repeats, batch, needed)
    problems += bucket_problems(cfg, keys)
    return report_lines(names, plan, skipped, batch), problems
