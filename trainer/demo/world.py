"""The demo's world: coloured shapes moving over plain backgrounds, one caption per clip, the concept the demo's LoRA
learns (a purple background named by a trigger word), its dataset and its config. `trainer.demo.pretrain` trains the
shipped tiny Wan on this world; `trainer.demo.run` teaches it the concept."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainer.config.schema import WanforgeConfig
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (50, 90, 230), "yellow": (235, 215, 40)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (240, 240, 240), "grey": (128, 128, 128)}
SHAPES = ("square", "circle")
MOTIONS = {"left to right": (1, 0), "top to bottom": (0, 1)}
# the concept the demo's LoRA teaches: a background colour the base model never saw, named by a trigger word
TRIGGER = "wfz"
CONCEPT_BACKGROUND = (150, 50, 200)  # purple
DEMO_FRAMES, DEMO_SIZE = 9, 64  # the shipped model's clip shape (the tiny flavour's default)
DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo_wan"
DEMO_GUIDANCE = 4.0  # classifier-free guidance against the empty caption (the base saw 10 % empty captions)
DEMO_CLIPS = 8  # of the 16 concept clips: the other 8 combinations stay unseen
# the before/after prompt: a combination the LoRA never trained on, so the sheet shows the concept, not a copy
DEMO_PROMPT = "a yellow circle moves from top to bottom on a <token> background"


def caption(shape: str, colour: str, motion: str, background: str) -> str:
    return f"a {colour} {shape} moves from {motion} on a {background} background"


def draw_clip(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], motion: tuple[float, float],
              frames: int, size: int, radius: int | None = None, centre: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """[frames, size, size, 3] uint8: the shape crosses the frame along `motion` through `centre` (fractions)."""
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    radius = radius or size // 6
    for f in range(frames):
        progress = f / max(frames - 1, 1)
        cx = round(centre[0] * size + motion[0] * (progress - 0.5) * (size - 3 * radius))
        cy = round(centre[1] * size + motion[1] * (progress - 0.5) * (size - 3 * radius))
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            inside = (abs(xx - cx) <= radius) & (abs(yy - cy) <= radius)
        video[f] = background
        video[f][inside] = colour
    return video


def world_clips(frames: int = DEMO_FRAMES, size: int = DEMO_SIZE) -> list[tuple[str, np.ndarray]]:
    """Every (caption, clip) of the base world: each shape, colour, background and motion once."""
    return [
        (caption(s, c, m, b), draw_clip(s, COLOURS[c], BACKGROUNDS[b], MOTIONS[m], frames, size))
        for s, c, b, m in itertools.product(SHAPES, COLOURS, BACKGROUNDS, MOTIONS)
    ]


def concept_clips(frames: int = DEMO_FRAMES, size: int = DEMO_SIZE) -> list[tuple[str, np.ndarray]]:
    """Every shape, colour and motion on the concept background, captioned with the trigger word (16 clips)."""
    return [
        (caption(s, c, m, TRIGGER), draw_clip(s, COLOURS[c], CONCEPT_BACKGROUND, MOTIONS[m], frames, size))
        for s, c, m in itertools.product(SHAPES, COLOURS, MOTIONS)
    ]


def _write_clips(folder: Path, clips: list[tuple[str, np.ndarray]], fps: int) -> Path:
    from trainer.data.video import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    for i, (text, video) in enumerate(clips):
        write_mp4(folder / f"clip_{i:02d}.mp4", video, fps)
        (folder / f"clip_{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def make_demo_dataset(folder: Path, num_clips: int = 8, frames: int = 24, size: int = 64, fps: int = 16,
                      concept: bool = False) -> Path:
    """Write `num_clips` mp4 clips with same-stem .txt captions into folder: clips of the base world, or with
    `concept` clips of the trigger-word background (what the demo's LoRA learns). Spread over shapes, colours,
    backgrounds and motions."""
    pool = concept_clips(frames, size) if concept else world_clips(frames, size)
    return _write_clips(folder, [pool[(i * 7) % len(pool)] for i in range(num_clips)], fps)


def demo_config(data_dir: Path, output_dir: Path, max_train_steps: int = 100, model_dir: Path | None = None,
                ) -> WanforgeConfig:
    """The tiny-model config the demo trains with. model_dir: a pre-trained tiny Wan (the shipped one in the demo);
    None: the random tiny model (tests)."""
    from trainer.config.files import config_from_dict

    raw = {
        "model": {"flavour": "tiny"},
        "datasets": [{"path": str(data_dir), "num_frames": DEMO_FRAMES, "width": DEMO_SIZE, "height": DEMO_SIZE}],
        "lora": {"rank": 16},
        "train": {"output_dir": str(output_dir), "max_train_steps": max_train_steps, "train_batch_size": 2, "seed": 0},
        "optim": {"learning_rate": 1e-3, "lr_warmup_steps": 10},
        "validation": {"num_inference_steps": 10},
        "checkpoint": {"every_n_steps": max(1, max_train_steps // 2), "total_limit": 2},
        "memory": {"gradient_checkpointing": "none"},
    }
    if model_dir is not None:
        raw["model"]["pretrained_model_name_or_path"] = str(model_dir)
        # the base was pre-trained with the empty caption as its unconditional input
        raw["validation"].update(prompt=DEMO_PROMPT, instance_prompt=TRIGGER, negative_prompt="",
                                 guidance_scale=DEMO_GUIDANCE, num_inference_steps=20,
                                 eval_every_n_steps=max_train_steps)
    return config_from_dict(raw, source="demo")


# ---------------------------------------------------------------- VACE: clips with their control inputs


def control_clip(shape: str, motion: tuple[float, float], frames: int, size: int) -> np.ndarray:
    """The control of a world clip: the shape's white silhouette on black, moving the same way (a pose / edge map
    stands in the same relation to a real clip)."""
    return draw_clip(shape, (255, 255, 255), (0, 0, 0), motion, frames, size)


def make_vace_dataset(folder: Path, num_clips: int = 8, frames: int = 24, size: int = 64, fps: int = 16,
                      mask: bool = False, references: bool = False) -> Path:
    """World clips with same-stem captions in `folder`, their silhouette control clips in `folder/control`, and
    with `mask` a mask image per clip in `folder/masks` (the left half kept from the control, the right half generated),
    with `references` a reference image per clip in `folder/references` (a swatch of the shape's colour). The layout
    docs/models.md describes for VACE datasets (control_path = "control", mask_path = "masks",
    reference_path = "references")."""
    from PIL import Image

    from trainer.data.video import write_mp4

    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS, MOTIONS))
    for sub in ("control", *(("masks",) if mask else ()), *(("references",) if references else ())):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(num_clips):
        s, c, b, m = combos[(i * 7) % len(combos)]
        stem = f"clip_{i:02d}"
        write_mp4(folder / f"{stem}.mp4", draw_clip(s, COLOURS[c], BACKGROUNDS[b], MOTIONS[m], frames, size), fps)
        (folder / f"{stem}.txt").write_text(caption(s, c, m, b) + "\n", encoding="utf-8")
        write_mp4(folder / "control" / f"{stem}.mp4", control_clip(s, MOTIONS[m], frames, size), fps)
        if mask:
            half = np.zeros((size, size, 3), dtype=np.uint8)
            half[:, size // 2:] = 255
            Image.fromarray(half).save(folder / "masks" / f"{stem}.png")
        if references:
            swatch = np.full((size // 2, size, 3), COLOURS[c], dtype=np.uint8)  # another aspect: letterboxed
            Image.fromarray(swatch).save(folder / "references" / f"{stem}.png")
    return folder
