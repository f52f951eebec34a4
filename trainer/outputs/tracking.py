"""Trackers through accelerate (W&B with videos, TensorBoard with contact sheets) under a run id that survives resumes.

The run id lives in run.json: SKYPILOT_TASK_ID when SkyPilot runs the job (stable across managed-job recoveries),
else a random id made on the first start. W&B resumes that same run; TensorBoard appends to the same folder.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from trainer.config.files import to_toml_dict
from trainer.config.schema import WanforgeConfig
from trainer.rundir import RunDir


def run_id_for(run: RunDir) -> str:
    """The id this run already has, or a new one (SkyPilot's task id first)."""
    return run.read_status().get("run_id") or os.environ.get("SKYPILOT_TASK_ID") or uuid.uuid4().hex[:12]


def _flat_config(cfg: WanforgeConfig) -> dict[str, int | float | str | bool]:
    return {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for section, values in to_toml_dict(cfg).items() if isinstance(values, dict) for k, v in values.items()}


def tracker_init_kwargs(cfg: WanforgeConfig, run: RunDir) -> dict:
    run_id = run.read_status().get("run_id")
    name = cfg.tracking.run_name or run.root.name
    if cfg.tracking.report_to == "wandb":
        wandb = {"name": name, "id": run_id, "resume": "allow", "dir": str(run.root)}
        if cfg.tracking.entity:
            wandb["entity"] = cfg.tracking.entity
        return {"wandb": wandb}
    return {}


def init_trackers(cfg: WanforgeConfig, run: RunDir, accelerator) -> None:
    if cfg.tracking.report_to == "none":
        return
    accelerator.init_trackers(cfg.tracking.project, config=_flat_config(cfg), init_kwargs=tracker_init_kwargs(cfg, run))


def log_validation(accelerator, cfg: WanforgeConfig, videos: list[tuple[str, Path]], sheet: Path | None, step: int) -> None:
    """videos: (label, mp4 path). W&B gets the videos and the sheet; TensorBoard the sheet (it has no mp4 support)."""
    if cfg.tracking.report_to == "wandb":
        import wandb

        logged = {f"validation/{label}": wandb.Video(str(path), format="mp4", caption=label) for label, path in videos}
        if sheet is not None:
            logged["validation/contact_sheet"] = wandb.Image(str(sheet))
        accelerator.get_tracker("wandb").log(logged, step=step)
    elif cfg.tracking.report_to == "tensorboard" and sheet is not None:
        from PIL import Image

        image = np.asarray(Image.open(sheet).convert("RGB"))
        accelerator.get_tracker("tensorboard").log_images({"validation/contact_sheet": image}, step=step, dataformats="HWC")
