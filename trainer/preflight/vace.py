"""Preflight of VACE runs: every dataset of a VACE flavour names its control clips (and only VACE flavours do), the
options VACE cannot train with, and the validation control files. The pairing itself (unpaired and mismatched files,
with the reason) is part of the dataset scan (trainer.data.vace_pairing)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.data.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, probe
from trainer.flavours import FLAVOURS

if TYPE_CHECKING:
    from trainer.preflight.report import PreflightRun

_VACE_NAMES = ", ".join(n for n, f in FLAVOURS.items() if f.is_vace and f.hub_id is not None)


def check_vace(run: PreflightRun) -> None:
    cfg, flavour = run.cfg, run.flavour
    if not flavour.is_vace:
        _no_control_outside_vace(run)
        return
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled:
            continue
        if not ds.has_control:
            run.error(f'datasets[{i}]: {flavour.name} trains on clips with their control clips: set '
                      f'datasets[{i}].control_path = "control" (a folder of control clips named like the clips, inside '
                      f'the dataset folder) or datasets[{i}].control_pairing = "metadata"')
        elif ds.control_path is None and (ds.mask_path or ds.reference_path) and ds.control_pairing == "stem":
            run.error(f'datasets[{i}].mask_path / reference_path pair by stem beside control_path: set '
                      f'datasets[{i}].control_path = "control" too')
    if cfg.tread.routes:
        run.error("tread.routes: token routing cannot train a VACE flavour (the VACE hints are added to every token "
                  "between the blocks): remove the [tread] routes")
    _validation_files(run)


def _no_control_outside_vace(run: PreflightRun) -> None:
    cfg = run.cfg
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled:
            continue
        for name in ("control_path", "mask_path", "reference_path"):
            if getattr(ds, name) is not None:
                run.error(f"datasets[{i}].{name}: control inputs train only VACE flavours ({_VACE_NAMES}), not "
                          f"{run.flavour.name}: set model.flavour to one of them, or remove {name}")
        if ds.control_pairing == "metadata":
            run.error(f'datasets[{i}].control_pairing = "metadata": control inputs train only VACE flavours '
                      f'({_VACE_NAMES}): set model.flavour to one of them, or remove control_pairing')
    v = cfg.validation
    for name in ("control_video", "control_mask"):
        if getattr(v, name) is not None:
            run.error(f"validation.{name}: only VACE flavours render from a control clip: remove it")
    if v.reference_images:
        run.error("validation.reference_images: only VACE flavours take reference images: remove them")


def _default_control_long_enough(run: PreflightRun, frames: int) -> None:
    """validation.num_frames above the clips' length: the held-out clip's control must still cover the render."""
    from trainer.data.discovery import scan_dataset

    clips = scan_dataset(run.cfg.datasets[0], 0, run.flavour.name).clips
    if not clips:
        return  # the scan reports the empty dataset
    control = clips[-1].control.control
    have = probe(control).frames_at(run.flavour.fps)
    if have < frames:
        run.error(f"validation.num_frames = {frames}: the held-out clip's control {control.name} holds {have} frames "
                  f"at {run.flavour.fps} fps: lower validation.num_frames to {max(1, (have - 1) // 4 * 4 + 1)} or "
                  "set validation.control_video to a longer control clip")


def _validation_files(run: PreflightRun) -> None:
    """validation.control_video / control_mask / reference_images: readable, long enough for the render."""
    v = run.cfg.validation
    if v.control_mask is not None and v.control_video is None:
        run.error("validation.control_mask: a mask goes with validation.control_video: set control_video too, or remove "
                  "control_mask (the held-out clip's own mask is used by default)")
    frames = v.num_frames or run.cfg.dataset_shape(0)[0]
    if v.control_video is None and frames > run.cfg.dataset_shape(0)[0]:
        _default_control_long_enough(run, frames)
    for name in ("control_video", "control_mask"):
        path = getattr(v, name)
        if path is None:
            continue
        if path.suffix.lower() not in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
            run.error(f"validation.{name}: {path} is not a video or image ({', '.join(sorted(VIDEO_EXTENSIONS))}, "
                      f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            continue
        if not path.is_file():
            run.error(f"validation.{name}: {path} does not exist")
            continue
        try:
            info = probe(path)
        except MediaError as err:
            run.error(f"validation.{name}: {path}: {err}")
            continue
        have = info.frames_at(run.flavour.fps)
        if info.kind == "video" and have < frames:
            run.error(f"validation.{name}: {path} holds {have} frames at {run.flavour.fps} fps, fewer than the "
                      f"{frames} validation renders: use a longer clip or set validation.num_frames = "
                      f"{max(1, (have - 1) // 4 * 4 + 1)}")
    for path in map(Path, v.reference_images):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            run.error(f"validation.reference_images: {path} is not an image file "
                      f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
            continue
        try:
            probe(path)
        except MediaError as err:
            run.error(f"validation.reference_images: {path}: {err}")
