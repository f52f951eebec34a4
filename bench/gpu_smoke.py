"""GPU check of the real training path at the Wan 2.1 1.3B shape (random weights; nothing can be downloaded there).

Builds a diffusers-layout folder with a 1.3B-shaped WanTransformer3DModel and the real AutoencoderKLWan config
(random init), a UMT5 encoder with the real 4096 width but 2 layers (the 24-layer XXL would only cost start-up
time), generates 832x480 clips, then runs `wanforge train` through the CLI, then extends the run with --resume.

    python3 bench/gpu_smoke.py --work /tmp/smoke --steps 12
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = {**WAN_13B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}  # Wan 2.1 T2V 14B


def build_model(folder: Path, shape: dict = WAN_13B) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from trainer.model.tiny import build_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: a 14B model never exists in fp32 (57 GB)
        try:
            transformer = WanTransformer3DModel(**shape)
        finally:
            torch.set_default_dtype(torch.float32)
        vae = AutoencoderKLWan()
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                              num_heads=64, pad_token_id=0, eos_token_id=1)).to(torch.bfloat16)
    pipe = WanPipeline(tokenizer=build_tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=5.0))
    pipe.save_pretrained(folder)
    print("transformer params:", sum(p.numel() for p in transformer.parameters()) / 1e9, "B")


def make_clips(folder: Path, count: int = 4) -> None:
    from trainer.data.video import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    h, w, frames = 480, 832, 132
    yy, xx = np.mgrid[0:h, 0:w]
    for c in range(count):
        video = np.empty((frames, h, w, 3), dtype=np.uint8)
        for f in range(frames):
            video[f] = ((xx * 255 // w + f * 3) % 256)[..., None] * np.array([1, 0.5, 0.2])
            cx, cy = 100 + f * 4 + c * 40, 240 + int(80 * np.sin(f / 10 + c))
            video[f][(abs(xx - cx) < 40) & (abs(yy - cy) < 40)] = (255, 255 - 60 * c, 60 * c)
        write_mp4(folder / f"clip{c}.mp4", video, fps=24)
        (folder / f"clip{c}.txt").write_text(f"a bright square number {c} glides over a coloured gradient")


def write_config(path: Path, work: Path, run_dir: Path, steps: int, preset: str, checkpoint_every: int,
                 validation: str, flavour: str = "t2v-480p-1.3b-2.1", memory: str = "",
                 size: tuple[int, int, int] = (81, 480, 832)) -> None:
    """The run's config: the smoke model and clips at `size` (frames, height, width; 832x480x81), LoRA rank 16,
    `validation` as [validation] lines, `memory` as more [memory] lines."""
    frames, height, width = size
    path.write_text(f"""
[model]
flavour = "{flavour}"
pretrained_model_name_or_path = "{work / 'model'}"

[[datasets]]
path = "{work / 'clips'}"
num_frames = {frames}
width = {width}
height = {height}

[lora]
rank = 16

[train]
output_dir = "{run_dir}"
max_train_steps = {steps}
log_every_n_steps = 1

[validation]
{validation}

[memory]
preset = "{preset}"
{memory}

[checkpoint]
every_n_steps = {checkpoint_every}
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanforge-smoke"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--torchrun", type=int, default=0, help="start the first run under torchrun with N processes")
    ap.add_argument("--preset", default="auto", help="[memory] preset for the run (auto picks by GPU memory)")
    args = ap.parse_args()
    work = args.work
    t0 = time.time()
    if not (work / "model" / "model_index.json").exists():
        build_model(work / "model")
    make_clips(work / "clips")
    print(f"setup {time.time() - t0:.0f}s", flush=True)
    config = work / f"smoke-{args.preset}.toml"
    run_dir = work / f"run-{args.preset}"
    write_config(config, work, run_dir, args.steps, args.preset, args.steps // 2, "num_inference_steps = 4")
    cli = [sys.executable, "-m", "trainer.cli"]
    first = cli if not args.torchrun else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           f"--nproc_per_node={args.torchrun}", "-m", "trainer.cli"]
    t1 = time.time()
    subprocess.run(first + ["train", str(config)], check=True, cwd=ROOT)
    print(f"train {time.time() - t1:.0f}s", flush=True)
    t2 = time.time()
    subprocess.run(cli + ["train", str(config), "--set", f"train.max_train_steps={args.steps + 2}", "--resume", "latest"],
                   check=True, cwd=ROOT)
    print(f"extend {time.time() - t2:.0f}s", flush=True)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for r in steps:
        print(r)
    timed = [r["s_per_step"] for r in steps[2:args.steps]]
    print("median s/step after 2 warm-up steps:", float(np.median(timed)), "peak GiB:", max(r["peak_gib"] for r in steps))
    print(json.loads((run_dir / "run.json").read_text()))
    import av

    for video in sorted((run_dir / "validation").rglob("*.mp4")):
        with av.open(str(video)) as c:
            s = c.streams.video[0]
            print(video.relative_to(work), s.frames, s.width, s.height, s.average_rate)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
        last = sorted((run_dir / "validation").rglob("*.mp4"))[-1]
        (args.out / "validation.mp4").write_bytes(last.read_bytes())


if __name__ == "__main__":
    main()
