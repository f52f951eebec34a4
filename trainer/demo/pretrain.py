"""Pre-train the demo's tiny Wan (trainer/demo/assets/demo_wan) on the demo's own generated clips, reproducibly.

    python -m trainer.demo.pretrain --out trainer/demo/assets/demo_wan [--preview DIR]

Two stages, both seeded (the same machine and library versions give the same weights):
1. the VAE (a random one decodes any latent to noise) learns to reconstruct flat coloured shapes on flat
   backgrounds: random colours, sizes, positions and motions, so it can also draw what the base never saw. It starts
   from He-initialised convolutions (init_convolutions) and is trained at a moderate learning rate (1e-3 collapsed
   it to one output for every input) as an autoencoder on the posterior mean (what the cache encodes) with a little
   relative latent noise: sampling the posterior at its initial std (~1) hides the colours from the decoder,
   which then draws every clip as its blurred, desaturated average. Its latent mean / std per channel go into its
   config, as the Wan pipeline expects, and a round trip of each demo colour (cache encode -> validation decode) is printed;
2. the transformer learns flow matching (as trainer.loop.flow) on the VAE's latents of every clip of the demo's world
   (trainer.demo.world_clips), conditioned on the captions through the tiny random UMT5, with 10 % empty captions
   so classifier-free guidance works. The concept the demo's LoRA teaches is never shown.
The weights are saved in fp16 (a few MB). The defaults are the run that made the shipped weights, on one CUDA GPU
(the seconds, device and colour round trip are in the folder's pretrain.json); a CPU needs hours for the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.demo.world import DEMO_FRAMES, DEMO_SIZE, BACKGROUNDS, COLOURS, CONCEPT_BACKGROUND, SHAPES, draw_clip, world_clips
from trainer.loop.flow import flow_target, noisy_input, timesteps_from_sigmas

UNCOND_PROBABILITY = 0.1


def random_clips(rng: np.random.Generator, count: int, frames: int, size: int) -> np.ndarray:
    """[count, F, H, W, 3] uint8: a shape of any colour and size crossing a background of any colour."""
    out = np.empty((count, frames, size, size, 3), dtype=np.uint8)
    for i in range(count):
        angle = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(0.0, 1.0)
        out[i] = draw_clip(
            SHAPES[rng.integers(len(SHAPES))], tuple(rng.integers(0, 256, 3)), tuple(rng.integers(0, 256, 3)),
            (speed * math.cos(angle), speed * math.sin(angle)), frames, size, radius=int(rng.integers(size // 10, size // 4)),
            centre=(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)),
        )
    return out


def to_pixels(clips: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B,F,H,W,3] -> [-1, 1] [B,3,F,H,W], as trainer.data.cache.encode_videos feeds the VAE."""
    return torch.from_numpy(clips).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_step(loss: torch.Tensor, module: torch.nn.Module, opt, sched) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    sched.step()


def init_convolutions(module: torch.nn.Module) -> torch.nn.Module:
    """He-normal conv weights, zero biases. PyTorch's default conv init shrinks the signal at every layer while the
    biases add constants, so the random Wan VAE's output barely depends on its input (about 1/50 of the clips'
    spread) and training first sits at the average clip; from this init it reconstructs colours in far fewer steps."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    return module


def latents_for_decoder(mu: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """The posterior mean plus Gaussian noise of `noise` x its per-channel spread (detached), so the decoder learns to
    tolerate the transformer's small errors. Not a posterior sample: at the Wan VAE's initial posterior std (~1) a
    sample buries the mean, and the decoder learns the average clip (desaturated, blurred colours)."""
    spread = mu.detach().std(dim=(0, 2, 3, 4), keepdim=True)
    return mu + noise * spread * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)


def train_vae(vae, world: np.ndarray, args, device: torch.device, rng: np.random.Generator) -> float:
    """Reconstruction (L1 + MSE) of half world clips and half random ones, decoded from the posterior mean (plus a
    little relative noise) as the transformer's latents are, and a small L2 on the mean that keeps its scale bounded."""
    frames, size = world.shape[1:3]
    gen = torch.Generator(device).manual_seed(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    warmup = min(100, args.vae_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, warmup))
    vae.train()
    started, loss = time.perf_counter(), torch.zeros(())
    for step in range(args.vae_steps):
        half = args.vae_batch // 2
        picked = world[rng.integers(len(world), size=half)]
        x = to_pixels(np.concatenate([picked, random_clips(rng, args.vae_batch - half, frames, size)]), device)
        mu = vae.encode(x).latent_dist.mode()
        rec = vae.decode(latents_for_decoder(mu, args.vae_noise, gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_l2 * mu.pow(2).mean()
        optimizer_step(loss, vae, opt, sched)
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    vae.eval()
    return loss.item()


@torch.no_grad()
def posterior_modes(vae, clips: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.cat([vae.encode(to_pixels(clips[i:i + 16], device)).latent_dist.mode() for i in range(0, len(clips), 16)])


@torch.no_grad()
def set_latent_stats(vae, clips: np.ndarray, device: torch.device) -> None:
    """latents_mean / latents_std per channel over `clips`, into the VAE config (the pipeline normalises with them)."""
    mus = posterior_modes(vae, clips, device)
    dims = [0, 2, 3, 4]
    vae.register_to_config(latents_mean=mus.mean(dims).tolist(), latents_std=mus.std(dims).tolist())


@torch.no_grad()
def encode_latents(vae, clips: np.ndarray, device: torch.device) -> torch.Tensor:
    """The transformer's training latents, encoded exactly as `wanforge train` caches clips."""
    from trainer.data.cache import encode_videos

    return torch.cat([encode_videos(vae, torch.from_numpy(clips[i:i + 16]), device)
                      for i in range(0, len(clips), 16)]).to(device)


def train_transformer(transformer, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor, args,
                      device: torch.device) -> float:
    """Full fine-tune with the flow-matching loss of trainer.loop.flow; s uniform in (0, 1)."""
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.dit_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.dit_steps, 100))
    transformer.train()
    started, loss = time.perf_counter(), torch.zeros(())
    for step in range(args.dit_steps):
        idx = torch.randint(len(latents), (args.dit_batch,), generator=gen, device=device)
        x0 = latents[idx]
        cond = text[idx].clone()
        drop = torch.rand(args.dit_batch, generator=gen, device=device) < UNCOND_PROBABILITY
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigmas = torch.rand(args.dit_batch, generator=gen, device=device).clamp(1e-3, 1 - 1e-3)
        pred = transformer(hidden_states=noisy_input(x0, noise, sigmas), timestep=timesteps_from_sigmas(sigmas),
                           encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), flow_target(x0, noise))
        optimizer_step(loss, transformer, opt, sched)
        if step % 250 == 0 or step == args.dit_steps - 1:
            print(f"transformer step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    transformer.eval()
    return loss.item()


@torch.no_grad()
def round_trip(vae, transformer, clip: np.ndarray, device: torch.device) -> np.ndarray:
    """[F,H,W,3] uint8 -> the same clip encoded as training caches it (trainer.data.cache.encode_video: posterior mean,
    normalised with the VAE's latents_mean / latents_std) and decoded as validation renders it (the validation
    pipeline denormalises and decodes the latents it holds after its last step, which a step callback replaces)."""
    from trainer.data.cache import encode_video
    from trainer.outputs.validation_videos import ValidationPrompt, ValidationSettings, build_pipeline, generate

    latents = encode_video(vae, torch.from_numpy(clip), device)[None].to(device)
    frames, height, width = clip.shape[:3]
    settings = ValidationSettings(prompts=(ValidationPrompt("round-trip", ""),), negative_prompt="", num_frames=frames,
                                  height=height, width=width, guidance_scale=1.0, scheduler="unipc", flow_shift=3.0,
                                  steps=1, seed=0, fps=16)
    empty = torch.zeros(1, transformer.config.text_dim, device=device)
    out = generate(build_pipeline(transformer, vae, settings), settings, empty, empty, device,
                   callback=lambda *_: {"latents": latents})
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def colour_check_clips(frames: int = DEMO_FRAMES, size: int = DEMO_SIZE) -> dict[str, np.ndarray]:
    """A clip per colour the demo draws (shape colours on black, the concept background flat), to round-trip."""
    clips = {name: draw_clip("square", rgb, BACKGROUNDS["black"], (1, 0), frames, size) for name, rgb in COLOURS.items()}
    clips["wfz purple"] = draw_clip("circle", COLOURS["yellow"], CONCEPT_BACKGROUND, (0, 1), frames, size)
    return clips


def colour_table(vae, transformer, device: torch.device) -> list[str]:
    """Markdown rows: each check colour's RGB in and out of the round trip (the shape's centre; the background)."""
    rows = ["| clip | input RGB (centre / corner) | round trip RGB (centre / corner) |", "|---|---|---|"]
    for name, clip in colour_check_clips().items():
        out = round_trip(vae, transformer, clip, device)
        c = DEMO_SIZE // 2
        centre = lambda v: v[:, c - 3:c + 3, c - 3:c + 3].reshape(-1, 3).mean(0).round().astype(int).tolist()  # noqa: E731
        corner = lambda v: v[:, :6, :6].reshape(-1, 3).mean(0).round().astype(int).tolist()  # noqa: E731
        rows.append(f"| {name} | {centre(clip[4:5])} / {corner(clip)} | {centre(out[4:5])} / {corner(out)} |")
    return rows


def round_to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """The weights as they will load from the fp16 files, so everything downstream sees the shipped model."""
    return module.half().float()


def preview(pipe, prompts: list[str], path: Path, device: torch.device, guidance: float) -> None:
    """A contact sheet of `prompts` rendered by the pipeline (to look at before shipping)."""
    from trainer.outputs.contact_sheet import contact_sheet

    rows = []
    for prompt in prompts:
        frames = pipe(prompt=prompt, negative_prompt="", num_frames=DEMO_FRAMES, height=DEMO_SIZE, width=DEMO_SIZE,
                      num_inference_steps=20, guidance_scale=guidance, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(42)).frames[0]
        rows.append((prompt, np.repeat(np.repeat(frames, 3, axis=1), 3, axis=2)))
    contact_sheet(rows, path, columns=DEMO_FRAMES, max_tile_width=192)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write (replaced if it exists)")
    parser.add_argument("--preview", type=Path, help="folder for preview contact sheets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1800)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=3e-4)
    parser.add_argument("--vae-noise", type=float, default=0.1, help="latent noise while training the decoder, "
                        "relative to the latents' spread")
    parser.add_argument("--vae-l2", type=float, default=1e-4, help="weight of the mean-square latent penalty")
    parser.add_argument("--dit-steps", type=int, default=3000)
    parser.add_argument("--dit-batch", type=int, default=48)
    parser.add_argument("--dit-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from diffusers import WanPipeline

    from trainer.demo.world import DEMO_GUIDANCE, TRIGGER, caption
    from trainer.model.tiny import build_tokenizer, demo_transformer, demo_vae, flow_scheduler, save_pipeline, text_encoder

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    encoder = round_to_fp16(text_encoder()).to(device).eval()
    vae, transformer = init_convolutions(demo_vae()).to(device), demo_transformer().to(device)
    pipe = WanPipeline(tokenizer=build_tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=flow_scheduler())
    pipe.set_progress_bar_config(disable=True)

    captions, clips = zip(*world_clips())
    world = np.stack(clips)
    vae_loss = train_vae(vae, world, args, device, rng)
    round_to_fp16(vae)
    set_latent_stats(vae, np.concatenate([world, random_clips(rng, 64, DEMO_FRAMES, DEMO_SIZE)]), device)
    latents = encode_latents(vae, world, device)
    colours = colour_table(vae, transformer, device)
    print("\n".join(["VAE round trip (trainer.data.cache encode -> pipeline decode):", *colours]), flush=True)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=device)
        empty, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, device=device)
    dit_loss = train_transformer(transformer, latents, text, empty[0], args, device)
    round_to_fp16(transformer)
    seconds = time.perf_counter() - started

    if args.preview:
        args.preview.mkdir(parents=True, exist_ok=True)
        from trainer.outputs.contact_sheet import contact_sheet

        rows = []  # each clip, then its round trip (cache encode -> validation decode)
        for name, clip in [(captions[i], world[i]) for i in (0, 9, 20, 31)] + list(colour_check_clips().items()):
            rows += [(name, clip), ("  round trip", round_trip(vae, transformer, clip, device))]
        contact_sheet(rows, args.preview / "vae.png", columns=DEMO_FRAMES)
        prompts = [captions[i] for i in (0, 9, 22, 31, 40, 47)] + [caption("circle", "red", "left to right", TRIGGER)]
        preview(pipe, prompts, args.preview / "samples.png", device, DEMO_GUIDANCE)

    pipe.to(torch.float16)
    if args.out.exists():
        shutil.rmtree(args.out)
    save_pipeline(pipe, args.out)
    record = {"command": "python -m trainer.demo.pretrain " + " ".join(argv), "args": {k: str(v) for k, v in vars(args).items()},
              "seconds": round(seconds, 1), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "final_vae_loss": vae_loss, "final_transformer_loss": dit_loss,
              "vae_round_trip": colours}
    (args.out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
