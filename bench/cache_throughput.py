"""Latent caching throughput (clips/s) for 81-frame 832x480 Wan 2.1 samples, through wanforge's own cache code.

The VAE is diffusers' AutoencoderKLWan with its default config (the Wan 2.1 VAE: base_dim 96, z_dim 16, 4x8x8) and
random weights: speed does not depend on the weights. Source clips are generated here: 960x540 at 24 fps, 6 s, so
every sample is resampled to 16 fps by timestamps (81 of 144 source frames) and downscaled + cropped to 832x480,
exactly as training caches them.

Rows: decoding alone (CPU, per clip); plain diffusers `AutoencoderKLWan.encode` in fp32 and bf16 on clips already on
the GPU (the reference: nothing but the VAE, after a warm-up call), and bf16 with the cache's channels-last input, without
and with cuDNN benchmark; and the cache build
(`trainer.data.cache.encode_latent_entries`: decode threads ahead of the VAE, the VAE in `cache.vae_dtype` with
cuDNN-benchmarked convolutions, safetensors writes): once with the defaults from scratch (loading the VAE included),
then with the VAE loaded and warm (a real cache loads it once for the whole dataset) for the defaults (bf16, 2 decode
workers), 4 workers, and the former default (fp32, 2 workers). Also printed: how far the bf16 latent is from fp32's.

    PYTHONPATH=/tmp/site:$PWD python3 bench/cache_throughput.py --clips 8 --out $OUT/cache.md
    python bench/cache_throughput.py --tiny   # CPU check of the script's logic at toy shapes
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_clips(folder: Path, count: int, width: int, height: int, fps: int, seconds: float) -> None:
    from trainer.data.video import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    frames = int(fps * seconds)
    yy, xx = np.mgrid[0:height, 0:width]
    for c in range(count):
        video = np.empty((frames, height, width, 3), dtype=np.uint8)
        for f in range(frames):
            video[f] = ((xx * 255 // width + f * 3 + c * 17) % 256)[..., None] * np.array([1, 0.5, 0.2])
            cx, cy = (60 + f * 5 + c * 40) % width, height // 2 + int(height / 5 * np.sin(f / 10 + c))
            video[f][(abs(xx - cx) < width // 20) & (abs(yy - cy) < width // 20)] = (255, 255 - 20 * c, 20 * c)
        write_mp4(folder / f"clip_{c:02d}.mp4", video, fps)
        (folder / f"clip_{c:02d}.txt").write_text(f"a moving square, clip {c}")


def vae_folder(folder: Path, tiny: bool) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, dim_mult=[1, 2, 2, 2]) if tiny else AutoencoderKLWan()
    vae.save_pretrained(folder / "vae")
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="clips to cache per measurement (default 8)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU: checks the script, not the speed")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args()

    from trainer.config.files import config_from_dict
    from trainer.data.cache import encode_latent_entries, encode_videos, latent_spec, latent_path, read_sample
    from trainer.data.discovery import scan_dataset
    from trainer.model.components import load_vae
    from trainer.model.memory import cudnn_benchmark

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        src = dict(width=96, height=64, fps=24, seconds=1.0)
        shape = dict(flavour="tiny", width=64, height=48, num_frames=9)
    else:
        src = dict(width=960, height=540, fps=24, seconds=6.0)
        shape = dict(flavour="t2v-480p-1.3b-2.1", width=832, height=480, num_frames=81)
    work = Path(args.work or tempfile.mkdtemp(prefix="cache_bench_"))
    data = work / "data"
    t0 = time.perf_counter()
    make_clips(data, args.clips, **src)
    model = vae_folder(work / "model", args.tiny)
    print(f"setup: {args.clips} clips {src['width']}x{src['height']}@{src['fps']}fps x {src['seconds']}s, "
          f"{time.perf_counter() - t0:.1f}s; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")

    def config(workers: int, cache: Path, vae_dtype: str = "float32"):
        return config_from_dict({
            "model": {"flavour": shape["flavour"], "pretrained_vae_model_name_or_path": str(model)},
            "datasets": [{"path": str(data), "width": shape["width"], "height": shape["height"],
                          "num_frames": shape["num_frames"], "cache_dir": str(cache)}],
            "cache": {"decode_workers": workers, "vae_dtype": vae_dtype},
        })

    cfg = config(0, work / "cache0")
    scan = scan_dataset(cfg.datasets[0], 0, cfg.model.flavour)
    assert len(scan.clips) == args.clips, scan.problems
    specs = [latent_spec(cfg.datasets[0], cfg.model.flavour, c) for c in scan.clips]
    bucket = specs[0].bucket.key
    rows: list[tuple[str, float, float, str]] = []  # (what, clips/s, s/clip, note)

    t0 = time.perf_counter()
    videos = [read_sample(s) for s in specs]
    dt = time.perf_counter() - t0
    rows.append(("decode + resample + resize (1 thread)", args.clips / dt, dt / args.clips, f"-> {bucket}"))

    def time_encode(vae, inputs: list[torch.Tensor]) -> tuple[float, tuple]:
        """Seconds for vae.encode(...).latent_dist.mode() over `inputs`, after one warm-up call."""
        with torch.no_grad():
            vae.encode(inputs[0])
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for x in inputs:
                z = vae.encode(x).latent_dist.mode()
            sync(device)
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        return time.perf_counter() - t0, f"latent {tuple(z.shape[1:])}{peak}"

    latents = {}
    for dtype in (torch.float32, torch.bfloat16):  # plain diffusers: AutoencoderKLWan.encode, clips already on the GPU
        vae = load_vae(cfg.model, dtype).to(device).eval()
        # [1, 3, F, H, W] in [-1, 1], contiguous: what diffusers' VideoProcessor.preprocess_video hands the VAE
        staged = [(v.to(device).permute(3, 0, 1, 2)[None].to(dtype) / 127.5 - 1.0).contiguous() for v in videos]
        name = str(dtype).split(".")[-1]
        dt, note = time_encode(vae, staged)
        rows.append((f"plain `AutoencoderKLWan.encode`, {name} (clips on the GPU already)", args.clips / dt,
                     dt / args.clips, note))
        plain = rows[-1][1]
        if dtype == torch.bfloat16:  # the cache's own VAE call: channels-last input (as decoded), cuDNN benchmark
            staged = [x.contiguous(memory_format=torch.channels_last_3d) for x in staged]
            dt, note = time_encode(vae, staged)
            rows.append(("the same, channels-last input (the layout the cache hands the VAE)", args.clips / dt,
                         dt / args.clips, f"{args.clips / dt / plain:.2f}x plain; {note}"))
            with cudnn_benchmark():
                dt, note = time_encode(vae, staged)
            rows.append(("the same, channels-last input + cuDNN benchmark (the cache's VAE call)", args.clips / dt,
                         dt / args.clips, f"{args.clips / dt / plain:.2f}x plain; {note}"))
        latents[dtype] = encode_videos(vae, videos[0][None], device)  # the cache's normalised latent of clip 0
        del vae, staged
        if device.type == "cuda":
            torch.cuda.empty_cache()
    diff = latents[torch.bfloat16] - latents[torch.float32]
    rel = float(diff.pow(2).mean().sqrt() / latents[torch.float32].pow(2).mean().sqrt())
    plain_bf16 = plain

    def cache_run(workers: int, vae_dtype: str, vae=None) -> float:
        """Seconds for encode_latent_entries over all clips (a fresh cache folder each run)."""
        cfg = config(workers, work / f"cache{len(rows)}", vae_dtype)
        todo = [(latent_path(cfg, 0, s), s) for s in specs]
        t0 = time.perf_counter()
        built = encode_latent_entries(cfg, todo, device, show_progress=False, vae=vae)
        sync(device)
        assert built == args.clips and all(p.is_file() for p, _ in todo)
        return time.perf_counter() - t0

    dt = cache_run(2, "bfloat16")
    rows.append(("wanforge cache end to end, the defaults (bf16 VAE, 2 decode workers), loading the VAE included",
                 args.clips / dt, dt / args.clips, f"{args.clips / dt / plain_bf16:.2f}x plain bf16 encode"))
    for workers, vae_dtype in ((2, "bfloat16"), (4, "bfloat16"), (2, "float32")):
        dtype = getattr(torch, vae_dtype)
        vae = load_vae(cfg.model, dtype).to(device).eval()
        with cudnn_benchmark():  # warm-up, as the plain rows had theirs (cuDNN times this shape's algorithms once)
            encode_videos(vae, videos[0][None], device)
        dt = cache_run(workers, vae_dtype, vae)
        default = " (the defaults)" if workers == 2 and vae_dtype == "bfloat16" else ""
        rows.append((f"wanforge cache, VAE loaded and warm{default}: {vae_dtype}, {workers} decode workers",
                     args.clips / dt, dt / args.clips, f"{args.clips / dt / plain_bf16:.2f}x plain bf16 encode; "
                     "mp4 decode, resample, resize, encode, safetensors write"))
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--tiny: logic check, not a timing)"
    text = (f"device: {gpu}; torch {torch.__version__}; {args.clips} clips {src['width']}x{src['height']}@{src['fps']}"
            f" fps x {src['seconds']} s -> {bucket}; VAE: AutoencoderKLWan, {'tiny' if args.tiny else 'default'} "
            "config, random weights\n\n"
            f"| caching {bucket} ({args.clips} clips) | clips/s | s/clip | note |\n|---|---|---|---|\n")
    text += "".join(f"| {what} | {rate:.2f} | {per:.2f} | {note} |\n" for what, rate, per, note in rows)
    text += (f"\nbfloat16 vs float32 VAE, the cached (normalised) latent of clip 0: max abs difference "
             f"{float(diff.abs().max()):.4f}, RMS difference {rel:.2%} of the latent's RMS\n")
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
