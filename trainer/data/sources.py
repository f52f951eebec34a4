"""Where a dataset's files are: a local folder, or a Hugging Face dataset repo downloaded into that folder."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from trainer.config.data import DatasetConfig
from trainer.data.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from trainer.errors import UserError
from trainer.rundir import LOCK_FILE

log = logging.getLogger(__name__)

QUARANTINE = ".quarantine"


def dataset_folder(ds: DatasetConfig, index: int = 0) -> Path:
    """The local folder of a dataset; an hf_repo is fetched into ds.path first (only missing or changed files)."""
    if ds.hf_repo is not None:
        return download_hub_dataset(ds, index)
    if not ds.path.is_dir():
        raise UserError(f"datasets[{index}].path: {ds.path} is not a folder (point it at a folder of clips + captions)")
    return ds.path


def download_hub_dataset(ds: DatasetConfig, index: int = 0) -> Path:
    """snapshot_download into ds.path. Offline (HF_HUB_OFFLINE=1) an existing folder is used as it is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id=ds.hf_repo, repo_type="dataset", revision=ds.hf_revision, local_dir=ds.path)
    except LocalEntryNotFoundError:
        raise UserError(
            f"datasets[{index}].hf_repo: {ds.hf_repo} is not downloaded into {ds.path} and the Hub can't be reached "
            "(connect, or unset HF_HUB_OFFLINE)"
        ) from None
    except HfHubHTTPError as err:
        raise UserError(
            f"datasets[{index}].hf_repo: could not fetch {ds.hf_repo} ({str(err).splitlines()[0]}): check the repo id, "
            "and HF_TOKEN for private or gated datasets"
        ) from None
    return Path(folder)


def is_run_folder(folder: Path) -> bool:
    """A wanforge run folder (trainer.rundir: its lock file, or run.json beside validation/ or checkpoints/): its
    validation videos are outputs, never training clips."""
    if (folder / LOCK_FILE).is_file():
        return True
    return (folder / "run.json").is_file() and any((folder / d).is_dir() for d in ("validation", "checkpoints"))


def list_media(folder: Path, skip: dict[Path, str | None] | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(videos and images under folder, sorted; [(path, why it is left out)]). Hidden folders (caches, quarantine,
    .cache/huggingface) are left out silently; folder links are followed once (a link back up is listed, not
    walked forever); links that loop or lead nowhere, unreadable folders, run folders and the folders in `skip`
    (folder -> why; None: left out silently, e.g. VACE control folders) are listed with the reason, never raised."""
    skip_real = {_real(p): why for p, why in (skip or {}).items()}
    found: list[Path] = []
    left_out: list[tuple[Path, str]] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(directory: Path, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            st = directory.stat()
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            left_out.append((directory, f"folder can't be read ({err.strerror or err})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            left_out.append((directory, "a folder link that leads back into its own folder: not followed"))
            return
        if key in seen_dirs:
            return  # a second link to a folder already listed
        seen_dirs.add(key)
        if is_run_folder(directory):
            left_out.append((directory, "a wanforge run folder (its videos are outputs, not training clips): put "
                                        "train.output_dir outside the dataset"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            is_media = path.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
            try:
                target = os.stat(path)  # follows links
            except OSError as err:
                if entry.is_symlink() and (is_media or err.errno == errno.ELOOP):
                    left_out.append((path, _broken_link(path, err)))
                elif is_media:
                    left_out.append((path, f"can't be read ({err.strerror or err})"))
                continue
            if stat.S_ISDIR(target.st_mode):
                real = _real(path)
                if real in skip_real:
                    if skip_real[real] is not None:
                        left_out.extend((p, skip_real[real]) for p in media_below(path))
                    continue
                walk(path, (*ancestors, key))
            elif is_media and stat.S_ISREG(target.st_mode):
                found.append(path)
            elif is_media:
                left_out.append((path, "not a regular file"))

    if _real(folder) in skip_real:
        why = skip_real[_real(folder)]
        return [], [(p, why) for p in media_below(folder)] if why is not None else []
    walk(folder, ())
    return sorted(found), left_out


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _broken_link(path: Path, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return f"a link that loops ({path.name} -> {os.readlink(path)} -> ...): point it at a real file or remove it"
    return f"a link to {os.readlink(path)}, which does not exist: point it at the file or remove it"


def media_below(folder: Path) -> list[Path]:
    """Media files under a folder that is skipped as a whole (for the list of what was left out)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(root) / f for f in files if Path(f).suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
                and not f.startswith(".")]
    return sorted(out)


def quarantine(folder: Path, file: Path, why: str, caption_extension: str = ".txt") -> Path:
    """Move an unusable file (and its caption) to <folder>/.quarantine/, keeping its relative path; write why beside it."""
    rel = file.relative_to(folder)
    target = folder / QUARANTINE / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    file.replace(target)
    caption = file.with_suffix(caption_extension)
    if caption.is_file():
        caption.replace(target.with_suffix(caption_extension))
    target.with_name(target.name + ".why.txt").write_text(why + "\n", encoding="utf-8")
    log.warning("moved %s to %s: %s", file, target, why)
    return target
