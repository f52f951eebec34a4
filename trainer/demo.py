"""`wanforge demo`: a pre-trained tiny Wan learns one new concept from generated clips with a LoRA on CPU.

The demo's world is coloured shapes moving on plain backgrounds, one caption per clip. The shipped tiny Wan
(trainer/assets/demo_wan, made by `python -m trainer.demo_pretrain`) was trained on every clip of that world; the
demo's LoRA teaches it a background it never saw, named by a trigger word, through the real `train` path. The
result is a before/after (base vs base + LoRA, same prompt and seed) as an mp4 and a contact sheet, and the drop
of the fixed-noise eval loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainer.config import WanforgeConfig

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
    from trainer.video import write_mp4

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
    from trainer.config import config_from_dict

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


@dataclass
class DemoResult:
    config: Path
    data: Path
    run_dir: Path
    lora_file: Path
    prompt: str
    before_after_video: Path
    before_after_sheet: Path
    eval_loss_before: float
    eval_loss_after: float

    def summary(self) -> str:
        drop = 1.0 - self.eval_loss_after / self.eval_loss_before
        return "\n".join([
            f"  learned          : '{TRIGGER}' = a purple background the base model never saw",
            f"  eval loss        : {self.eval_loss_before:.4f} -> {self.eval_loss_after:.4f} ({drop:.0%} lower; fixed noise, "
            "base vs base + LoRA)",
            f"  before / after   : {self.before_after_sheet}",
            f"                     {self.before_after_video}  (left: base, right: base + LoRA; prompt '{self.prompt}')",
            f"  clips + captions : {self.data}",
            f"  config           : {self.config}  (train it again: wanforge train {self.config} --resume latest)",
            f"  LoRA             : {self.lora_file}",
            f"  metrics          : {self.run_dir / 'metrics.jsonl'}",
        ])


def _enlarge(frames: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(frames, factor, axis=1), factor, axis=2)


def _eval_loss_after(run_dir: Path) -> float:
    """The last eval loss the training run logged (trainer.eval_loss, at its final step)."""
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def run_demo(out: Path, steps: int = 100, show_progress: bool = True, model_dir: Path = DEMO_MODEL_DIR) -> DemoResult:
    """Concept clips -> base render and eval loss -> `train` (LoRA, its validation render, its eval loss) -> one
    before/after mp4 and contact sheet of the same prompt and seed."""
    import torch

    from trainer.cache import build_caches
    from trainer.components import load_transformer, load_vae
    from trainer.config import save_config
    from trainer.contact_sheet import contact_sheet
    from trainer.eval_loss import eval_record, split_eval_samples
    from trainer.train import train
    from trainer.validation_round import prompt_embeds
    from trainer.validation_videos import build_pipeline, render, settings_for, validation_texts
    from trainer.video import decode_frames, write_mp4

    data = make_demo_dataset(out / "data", num_clips=DEMO_CLIPS, frames=DEMO_FRAMES, size=DEMO_SIZE, concept=True)
    cfg = demo_config(data, out / "run", max_train_steps=steps, model_dir=model_dir)
    save_config(cfg, out / "demo.toml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # before: the base model on the same clips (the caches are the ones `train` then reuses) and the same prompt
    report = build_caches(cfg, device, extra_texts=validation_texts(cfg), show_progress=False)
    _, eval_samples = split_eval_samples(cfg, report.samples)
    settings = settings_for(cfg, None)
    with torch.no_grad():
        base = load_transformer(cfg.model).to(device)
        before_loss = eval_record(base, eval_samples, cfg, device, step=0)["eval_loss"]
        pipe = build_pipeline(base, load_vae(cfg.model).to(device), settings, cfg)
        before = render(pipe, settings, prompt_embeds(cfg, settings, device), out / "before", device)[0]
    del base, pipe
    result = train(cfg, show_progress=show_progress)

    factor = 3
    frames_before = _enlarge(np.stack(decode_frames(before.path)[0]), factor)
    frames_after = _enlarge(np.stack(decode_frames(result.videos[0])[0]), factor)
    gap = np.zeros((*frames_before.shape[:2], 8, 3), dtype=np.uint8)
    video = write_mp4(out / "before_after.mp4", np.concatenate([frames_before, gap, frames_after], axis=2), settings.fps)
    sheet = contact_sheet([(f"base: {settings.prompt}", frames_before), (f"base + LoRA ({steps} steps)", frames_after)],
                          out / "before_after.png", columns=DEMO_FRAMES, max_tile_width=DEMO_SIZE * factor)
    return DemoResult(out / "demo.toml", data, result.run_dir, result.lora_file, settings.prompt, video, sheet,
                      before_loss, _eval_loss_after(result.run_dir))

