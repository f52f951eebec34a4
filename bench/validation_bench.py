"""Validation rendering at the real Wan 2.1 1.3B shape (random weights: timing and plumbing, not quality).

Renders 832x480x81 with 40 steps: UniPC, UniPC + skip-layer guidance (block 9, 10%-90%), flow-match Euler, and
an EMA swap, in bf16 autocast as training validates; checks each mp4 decodes with 81 frames at 16 fps and prints a
markdown table (seconds per video, peak GiB, the extra forward passes SLG cost).

`--baseline` instead times plain diffusers beside wanforge's path in one process, each to the same mp4 writer: a
`WanPipeline` as its model card sets it up (bf16 transformer, fp32 VAE, the default attention, UniPC with the 480p
flow shift 3.0, CFG 5, 40 steps) and `trainer.outputs.validation_videos.generate` on the same transformer and LoRA after the
trainer's memory options (preset `balanced`: its attention backend; compiled blocks and cuDNN-benchmarked VAE
convolutions in the render), first render (compiles) and second (every later validation of a run).

    python3 bench/validation_bench.py                        # GPU, the real shape
    python3 bench/validation_bench.py --baseline --out $OUT/validation.md
    python3 bench/validation_bench.py --tiny [--baseline]    # CPU check of the script itself (the tiny model's shape)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config.model import LoraConfig  # noqa: E402
from trainer.config.training import EmaConfig
from trainer.data.video import decode_frames, write_mp4  # noqa: E402
from trainer.model.ema import AdapterEMA  # noqa: E402
from trainer.model.lora import add_lora, trainable_parameters  # noqa: E402
from trainer.outputs.skip_layers import SkipLayerGuidance  # noqa: E402
from trainer.outputs.validation_videos import ValidationPrompt, ValidationSettings, build_pipeline, generate  # noqa: E402


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    if tiny:
        from trainer.config.model import ModelConfig
        from trainer.model.components import load_transformer, load_vae

        model = ModelConfig(flavour="tiny")
        return load_transformer(model).to(device), load_vae(model).to(device), 32
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(  # Wan2.1-T2V-1.3B's config
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).to(device, dtype)
    vae = AutoencoderKLWan().to(device, torch.float32)  # the Wan 2.1 VAE's default config
    return transformer, vae, 4096


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def baseline(args, device: torch.device, dtype: torch.dtype) -> int:
    """Plain WanPipeline vs wanforge's validation path, same transformer + LoRA, same mp4 writer."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from trainer.config.files import config_from_dict
    from trainer.data.dataset import pad_text
    from trainer.model.trainable import make_trainable
    from trainer.outputs.validation_videos import PIPELINE_TEXT_LENGTH

    cuda = device.type == "cuda"
    transformer, vae, text_dim = build(args.tiny, device, dtype)
    trained = copy.deepcopy(transformer)  # wanforge's side, assembled by trainer.model.trainable below
    add_lora(transformer, LoraConfig(rank=16))
    with torch.no_grad():
        for p in trainable_parameters(transformer):
            p.normal_(0, 0.01)
    frames, height, width = (9, 64, 64) if args.tiny else (81, 480, 832)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(24, text_dim, generator=g), torch.randn(120, text_dim, generator=g)
    out = Path(tempfile.mkdtemp(prefix="validation-baseline-"))
    rows: list[tuple[str, float, float, np.ndarray]] = []

    def timed(name: str, render) -> None:
        sync(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        video = render()
        write_mp4(out / f"{len(rows)}.mp4", video, 16)
        sync(cuda)
        rows.append((name, time.perf_counter() - started,
                     torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), video))
        print(f"  {name}: {rows[-1][1]:.1f} s", flush=True)

    # plain diffusers, as the Wan2.1-T2V-1.3B-Diffusers model card runs it (its scheduler config: UniPC, flow shift 3)
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    embeds = [pad_text([e], PIPELINE_TEXT_LENGTH).to(device, dtype) for e in (prompt, negative)]
    transformer.eval()
    with torch.no_grad():  # warm-up, untimed: CUDA libraries' first calls (one step, a small VAE decode)
        pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=height, width=width, num_frames=frames,
             num_inference_steps=1, output_type="latent")
        vae.decode(torch.zeros(1, 16, 2, 8, 8, device=device, dtype=vae.dtype))
    timed("plain diffusers WanPipeline (bf16, fp32 VAE, default attention)", lambda: pipe(
        prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=height, width=width, num_frames=frames,
        guidance_scale=5.0, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(42)).frames[0])

    # wanforge: the transformer as training leaves it (memory preset balanced), its validation path
    cfg = config_from_dict({"memory": {"preset": "balanced" if cuda else "none"}, "datasets": [{"path": "/tmp"}]},
                           source="bench")
    make_trainable(trained, LoraConfig(rank=16), cfg.memory, device)
    lora = {k: v for k, v in transformer.state_dict().items() if "lora_" in k}
    assert lora and not trained.load_state_dict(lora, strict=False).unexpected_keys  # the same adapter weights
    trained.train()
    settings = ValidationSettings((ValidationPrompt("p", "p"),), "n", frames, height, width, 5.0, "unipc", 3.0,
                                  args.steps, 42, 16, None)
    ours = build_pipeline(trained, vae, settings)
    for which in ("first render: compiles the blocks", "second render: every later validation"):
        timed(f"wanforge validation ({which})",
              lambda: generate(ours, settings, prompt.to(device), negative.to(device), device, dtype if cuda else None))

    plain_s, plain_frames = rows[0][1], rows[0][3]
    gpu = torch.cuda.get_device_name() if cuda else "cpu (--tiny: logic check, not a timing)"
    text = (f"device: {gpu}; torch {torch.__version__}; Wan 2.1 1.3B shape{' (tiny)' if args.tiny else ''}, random "
            f"weights, LoRA r16 on both; {width}x{height}x{frames}, {args.steps} steps, CFG 5, UniPC flow shift 3, "
            f"decoded and written to mp4 (trainer.data.video.write_mp4)\n\n"
            "| render | s / video | vs plain | peak GiB | max abs frame difference vs plain |\n|---|---|---|---|---|\n")
    for name, seconds, peak, video in rows:
        diff = float(np.abs(video.astype(np.float32) - plain_frames.astype(np.float32)).max())
        text += f"| {name} | {seconds:.1f} | {seconds / plain_s:.2f}x | {peak:.1f} | {diff:.4f} |\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--baseline", action="store_true", help="plain WanPipeline vs wanforge's path (see above)")
    parser.add_argument("--out", type=Path, default=None, help="--baseline: write its table here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.baseline:
        return baseline(args, device, dtype)
    transformer, vae, text_dim = build(args.tiny, device, dtype)
    add_lora(transformer, LoraConfig(rank=32))
    params = trainable_parameters(transformer)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.01)
    ema = AdapterEMA(params, EmaConfig(use_ema=True))
    frames, height, width = (9, 64, 64) if args.tiny else (81, 480, 832)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(24, text_dim, generator=g), torch.randn(120, text_dim, generator=g)
    rows = []
    out = Path(tempfile.mkdtemp(prefix="validation-bench-"))

    def render(name: str, scheduler: str, slg: SkipLayerGuidance | None, use_ema: bool = False) -> None:
        settings = ValidationSettings((ValidationPrompt(name, name),), "n", frames, height, width, 5.0, scheduler, 5.0,
                                      args.steps, 42, 16, slg, compile=False)  # eager: the hook counts every forward
        pipe = build_pipeline(transformer, vae, settings)
        calls = {"n": 0}
        count = transformer.blocks[0].register_forward_pre_hook(  # block 0 runs in every pass, skipped ones too
            lambda *a: calls.__setitem__("n", calls["n"] + 1))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        context = ema.swapped_in() if use_ema else torch.no_grad()
        with context:
            video = generate(pipe, settings, prompt.to(device), negative.to(device), device, dtype if cuda else None)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        count.remove()
        path = write_mp4(out / f"{name}.mp4", video, 16)
        decoded, times = decode_frames(path)
        ok = len(decoded) == frames and decoded[0].shape[:2] == (height, width) and abs(times[1] - 1 / 16) < 1e-3
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append((name, seconds, peak, calls["n"], ok))

    render("unipc", "unipc", None)
    render("unipc+slg", "unipc", SkipLayerGuidance((9,) if not args.tiny else (1,), 0.1, 0.9, 3.0))
    render("flow_match_euler", "flow_match_euler", None)
    render("unipc, EMA weights", "unipc", None, use_ema=True)
    started = time.perf_counter()
    for step in range(1, 11):
        ema.after_step(step)
    if cuda:
        torch.cuda.synchronize()
    ema_ms = (time.perf_counter() - started) / 10 * 1000

    shape = f"{width}x{height}x{frames}, {args.steps} steps, CFG 5"
    print(f"\n### Validation rendering ({'tiny, CPU' if args.tiny else 'Wan 2.1 1.3B shape, random weights'}; {shape})\n")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}\n")
    print("| render | s / video | peak GiB | transformer forwards | mp4 decodes (frames, size, 16 fps) |")
    print("|---|---|---|---|---|")
    for name, seconds, peak, calls, ok in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.1f} | {calls} | {'yes' if ok else 'NO'} |")
    print(f"\nEMA update of {sum(p.numel() for p in params) / 1e6:.1f} M LoRA parameters: {ema_ms:.2f} ms / step")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
