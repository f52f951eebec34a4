"""`wanforge demo`: a pre-trained tiny Wan learns one new concept from generated clips with a LoRA on CPU.

The demo's world is coloured shapes moving on plain backgrounds, one caption per clip. The shipped tiny Wan
(trainer/demo/assets/demo_wan, made by `python -m trainer.demo.pretrain`) was trained on every clip of that world; the
demo's LoRA teaches it a background it never saw, named by a trigger word, through the real `train` path. The
result is a before/after (base vs base + LoRA, same prompt and seed) as an mp4 and a contact sheet, and the drop
of the fixed-noise eval loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.demo.world import (DEMO_CLIPS, DEMO_FRAMES, DEMO_MODEL_DIR, DEMO_SIZE, TRIGGER, demo_config,
                                 make_demo_dataset)


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
    """The last eval loss the training run logged (trainer.loop.eval_loss, at its final step)."""
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def run_demo(out: Path, steps: int = 100, show_progress: bool = True, model_dir: Path = DEMO_MODEL_DIR) -> DemoResult:
    """Concept clips -> base render and eval loss -> `train` (LoRA, its validation render, its eval loss) -> one
    before/after mp4 and contact sheet of the same prompt and seed."""
    import torch

    from trainer.config.files import save_config
    from trainer.data.cache import build_caches
    from trainer.data.video import decode_frames, write_mp4
    from trainer.loop.eval_loss import eval_record, split_eval_samples
    from trainer.loop.train import train
    from trainer.model.components import load_transformer, load_vae
    from trainer.outputs.contact_sheet import contact_sheet
    from trainer.outputs.validation_round import prompt_embeds
    from trainer.outputs.validation_videos import build_pipeline, render, settings_for, validation_texts

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

