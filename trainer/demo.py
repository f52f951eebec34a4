"""`wanforge demo`: generated clips of moving coloured shapes, the tiny Wan, a LoRA trained on CPU, one video."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.config import WanforgeConfig, config_from_dict
from trainer.video import write_mp4

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (50, 90, 230), "yellow": (235, 215, 40)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (240, 240, 240)}
MOTIONS = {"left to right": (1, 0), "top to bottom": (0, 1)}


def _clip(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], motion: tuple[int, int],
          frames: int, size: int) -> np.ndarray:
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    radius = size // 6
    for f in range(frames):
        progress = f / max(frames - 1, 1)
        cx = size // 2 + int(motion[0] * (progress - 0.5) * (size - 3 * radius))
        cy = size // 2 + int(motion[1] * (progress - 0.5) * (size - 3 * radius))
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            inside = (abs(xx - cx) <= radius) & (abs(yy - cy) <= radius)
        video[f] = background
        video[f][inside] = colour
    return video


def make_demo_dataset(folder: Path, num_clips: int = 8, frames: int = 24, size: int = 64, fps: int = 16) -> Path:
    """Write `num_clips` mp4 clips (1.5 s at 16 fps) with same-stem .txt captions into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(s, c, b, m) for m in MOTIONS for s in ("square", "circle") for c in COLOURS for b in BACKGROUNDS]
    for i in range(num_clips):
        shape, colour, background, motion = combos[(i * 7) % len(combos)]
        video = _clip(shape, COLOURS[colour], BACKGROUNDS[background], MOTIONS[motion], frames, size)
        write_mp4(folder / f"clip_{i:02d}.mp4", video, fps)
        caption = f"a {colour} {shape} moves from {motion} on a {background} background"
        (folder / f"clip_{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def demo_config(data_dir: Path, output_dir: Path, max_train_steps: int = 100) -> WanforgeConfig:
    """The tiny-model config the demo trains with: settings that visibly learn in ~100 CPU steps."""
    return config_from_dict(
        {
            "model": {"flavour": "tiny"},
            "datasets": [{"path": str(data_dir), "num_frames": 9, "width": 64, "height": 64}],
            "lora": {"rank": 16},
            "train": {"output_dir": str(output_dir), "max_train_steps": max_train_steps, "train_batch_size": 2,
                      "seed": 0},
            "optim": {"learning_rate": 1e-3, "lr_warmup_steps": 10},
            "validation": {"num_inference_steps": 10},
            "checkpoint": {"every_n_steps": max(1, max_train_steps // 2), "total_limit": 2},
            "memory": {"gradient_checkpointing": "none"},
        },
        source="demo",
    )
