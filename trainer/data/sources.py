"""Where a dataset's files are: a local folder, or a Hugging Face dataset repo downloaded into that folder."""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.config.data import DatasetConfig
from trainer.data.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from trainer.errors import UserError

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


def list_media(folder: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Videos and images under folder, sorted; hidden folders (caches, quarantine, .cache/huggingface) left out."""
    skip_resolved = tuple(p.resolve() for p in skip)
    found = []
    for p in folder.rglob("*"):
        if p.suffix.lower() not in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS or not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if skip_resolved and any(s == p.resolve() or s in p.resolve().parents for s in skip_resolved):
            continue
        found.append(p)
    return sorted(found)


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
