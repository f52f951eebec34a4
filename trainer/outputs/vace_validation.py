"""What a VACE validation renders from: a control clip (+ mask, + reference images) at the render's size and length,
given to WanVACEPipeline as its `video` / `mask` / `reference_images`, and shown above the results in the contact sheet.

The control is `validation.control_video` (with `control_mask` and `reference_images`), or by default the control
inputs of the first dataset's last usable clip: the clip `validation.eval_holdout` keeps out of training, so the render
shows the LoRA following a control it did not train on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.config.schema import WanforgeConfig
from trainer.data.probe import IMAGE_EXTENSIONS
from trainer.errors import UserError
from trainer.flavours import get_flavour


@dataclass
class ValidationControl:
    control: np.ndarray  # [F, H, W, 3] uint8 at the render's size
    mask: np.ndarray | None = None  # the same shape, or None: every pixel is generated
    references: list = field(default_factory=list)  # PIL images as given (the pipeline letterboxes them)
    source: Path | None = None

    def call_kwargs(self) -> dict:
        """WanVACEPipeline's control arguments."""
        from PIL import Image

        return {"video": [Image.fromarray(f) for f in self.control],
                "mask": [Image.fromarray(f) for f in self.mask] if self.mask is not None else None,
                "reference_images": list(self.references) or None}

    def sheet_rows(self) -> list[tuple[str, np.ndarray]]:
        """The contact sheet's first rows: the control (and mask) the videos below were rendered from."""
        rows = [("control", self.control)]
        if self.mask is not None:
            rows.append(("mask", self.mask))
        return rows


def _frames(path: Path, num_frames: int, height: int, width: int, fps: float, field_name: str) -> np.ndarray:
    from trainer.data.probe import MediaError
    from trainer.data.video import fit_to_size, load_clip, read_image

    try:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            image = read_image(path, lambda f: fit_to_size(f, width, height))
            return np.repeat(image, num_frames, axis=0)
        return load_clip(path, num_frames, height, width, fps).numpy()
    except (MediaError, OSError) as err:
        raise UserError(f"{field_name}: {path} can't be used for a {num_frames}-frame render at {fps:g} fps ({err}): "
                        "give a control clip at least that long, or lower validation.num_frames") from None


def _default_sources(cfg: WanforgeConfig):
    from trainer.data.discovery import scan_dataset

    clips = scan_dataset(cfg.datasets[0], 0, cfg.model.flavour).clips
    if not clips:
        raise UserError(f"{cfg.datasets[0].path}: VACE validation needs a clip with its control clip (or set "
                        "validation.control_video)")
    return clips[-1].control


def default_caption(cfg: WanforgeConfig, captions: list[str]) -> str | None:
    """The caption validation renders when no prompt is set, from the first dataset's captions in order: its first,
    or for VACE with the default control its last (the caption of the clip whose control is rendered)."""
    if not captions:
        return None
    vace_default = get_flavour(cfg.model.flavour).is_vace and cfg.validation.control_video is None
    return captions[-1] if vace_default else captions[0]


def validation_control(cfg: WanforgeConfig, num_frames: int, height: int, width: int) -> ValidationControl:
    """The control inputs of a VACE validation at this size and length."""
    from PIL import Image

    v, fps = cfg.validation, get_flavour(cfg.model.flavour).fps
    if v.control_video is not None:
        control, mask, refs = v.control_video, v.control_mask, [Path(p) for p in v.reference_images]
        names = ("validation.control_video", "validation.control_mask")
    else:
        files = _default_sources(cfg)
        control, mask = files.control, v.control_mask or files.mask
        refs = [Path(p) for p in v.reference_images] or list(files.references)
        names = (f"datasets[0] control clip {control.name}", "validation.control_mask")
    frames = _frames(control, num_frames, height, width, fps, names[0])
    mask_frames = _frames(mask, num_frames, height, width, fps, names[1]) if mask is not None else None
    images = []
    for path in refs:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError as err:
            raise UserError(f"validation.reference_images: {path} is not a readable image ({err})") from None
    return ValidationControl(frames, mask_frames, images, control)
