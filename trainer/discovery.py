"""Find training clips and their captions in a dataset folder; list what can't be used and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import DatasetConfig
from trainer.errors import UserError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".webm", ".mkv", ".avi"}


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str


@dataclass
class Scan:
    clips: list[Clip] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it is skipped)


def scan_dataset(ds: DatasetConfig, index: int = 0) -> Scan:
    if not ds.path.is_dir():
        raise UserError(f"datasets[{index}].path: {ds.path} is not a folder (point it at a folder of clips + captions)")
    scan = Scan()
    cache_root = ds.cache_dir.resolve() if ds.cache_dir else None
    for video in sorted(p for p in ds.path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        if any(part.startswith(".") for part in video.relative_to(ds.path).parts):
            continue  # hidden folders: our own cache, quarantine, editor files
        if cache_root is not None and cache_root in video.resolve().parents:
            continue
        caption_file = video.with_suffix(ds.caption_extension)
        if not caption_file.is_file():
            scan.problems.append((video, f"no caption: expected {caption_file.name}"))
            continue
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            scan.problems.append((video, f"empty caption in {caption_file.name}"))
            continue
        scan.clips.append(Clip(video=video, caption=caption))
    return scan
