"""Validation a user does not wait for (issue 32, item 4): the same prompt rendered at 40 steps (CFG 5, no extra adapter)
and at 4 steps with a speed-LoRA-shaped adapter (a random LoRA of rank 64 on every linear layer of the blocks, CFG 1),
through wanforge's own validation path (`[[validation.renders]]`, `validation_round`: the adapter file is converted by
diffusers' Wan converter, loaded with `load_lora_weights` and stacked on the run's LoRA with `set_adapters`, then taken
off), at the real Wan 2.1 1.3B shape with random weights (832x480x81; nothing is downloaded).

Each render runs once untimed (the first compiles the blocks), then `--repeats` timed; the adapter's own load and
unload time is part of the speed render's time, as in training. Then the share of a default run's wall time spent in
validation and the eval loss: measured here (training steps, one validation round, one eval pass of
eval_samples x eval_buckets forwards at the training shape, on the same model), or read from a run's metrics.jsonl
(`--metrics`: the trainer records `validation_s` and `eval_s`).

    python3 bench/validation_speed_bench.py --out $OUT/validation_speed.md     # GPU, the real shape
    python3 bench/validation_speed_bench.py --metrics RUN/metrics.jsonl        # the share of a real run, no GPU
    python3 bench/validation_speed_bench.py --tiny --full-steps 4 --speed-steps 1 --train-steps 1   # CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPEED_RANK = 64
FULL_STEPS, FULL_CFG = 40, 5.0
SPEED_STEPS, SPEED_CFG = 4, 1.0


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build(tiny: bool, device, dtype):
    """(trainable transformer with the run's LoRA r16 as training leaves it, VAE, text width, the config)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from trainer.config.files import config_from_dict
    from trainer.model.trainable import make_trainable

    cuda = device.type == "cuda"
    cfg = config_from_dict({"model": {"flavour": "tiny" if tiny else "t2v-480p-1.3b-2.1"},
                            "memory": {"preset": "balanced" if cuda else "none"}, "lora": {"rank": 16},
                            "datasets": [{"path": "/tmp"}]}, source="bench")
    torch.manual_seed(0)
    if tiny:
        from trainer.model.components import load_transformer, load_vae

        transformer, vae, text_dim = load_transformer(cfg.model), load_vae(cfg.model), 32
    else:
        transformer = WanTransformer3DModel(  # Wan2.1-T2V-1.3B's config
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ).to(dtype)
        vae, text_dim = AutoencoderKLWan(), 4096  # the Wan 2.1 VAE's default config
    make_trainable(transformer, cfg.lora, cfg.memory, device)
    with torch.no_grad():
        for p in transformer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return transformer, vae.to(device, torch.float32), text_dim, cfg


def speed_lora(transformer, path: Path) -> Path:
    """A speed-LoRA-shaped file: rank 64 on every linear layer of every block, original Wan names with alpha (the form
    the lightx2v / CausVid LoRAs come in), random weights small enough to keep the video finite."""
    import torch
    from safetensors.torch import save_file

    from trainer.model.lora_names import to_original
    from trainer.outputs.validation_adapters import linear_shapes_of

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (fan_in, fan_out) in linear_shapes_of(transformer).items():
        if not module.startswith("blocks."):
            continue
        name = f"diffusion_model.{to_original(module)}"
        tensors[f"{name}.lora_A.weight"] = (torch.randn(SPEED_RANK, fan_in, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{name}.lora_B.weight"] = (torch.randn(fan_out, SPEED_RANK, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(float(SPEED_RANK))
    save_file(tensors, str(path))
    return path


def render_times(transformer, vae, text_dim: int, tiny: bool, device, dtype, repeats: int, out: Path,
                 full_steps: int = FULL_STEPS, speed_steps: int = SPEED_STEPS) -> dict:
    """Seconds per video of the full and the speed render (first = compiling, then each timed repeat), and the peak."""
    import torch

    from trainer.outputs.validation_round import validation_round
    from trainer.outputs.validation_videos import (AdapterSpec, RenderSpec, ValidationPrompt, ValidationSettings,
                                                   build_pipeline)

    frames, height, width = (5, 32, 32) if tiny else (81, 480, 832)
    lora = speed_lora(transformer, out / "speed_lora.safetensors")
    base = ValidationSettings((ValidationPrompt("p", "p"),), "n", frames, height, width, FULL_CFG, "unipc", 5.0,
                              full_steps, 42, 16, None, compile=device.type == "cuda")
    renders = {"full": RenderSpec("full"),
               "speed": RenderSpec("speed", steps=speed_steps, guidance_scale=SPEED_CFG,
                                   adapters=(AdapterSpec(str(lora), 1.0),))}
    g = torch.Generator().manual_seed(0)
    embeds = {"p": torch.randn(24, text_dim, generator=g).to(device), "n": torch.randn(120, text_dim, generator=g).to(device)}
    pipe = build_pipeline(transformer, vae, base)
    transformer.train()  # as training leaves it; generate() switches to eval and back
    times: dict = {}
    for name, spec in renders.items():
        settings = replace(base, renders=(spec,))
        runs = []
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            started = time.perf_counter()
            result = validation_round(pipe, settings, embeds, out / f"{name}-{i}", device,
                                      dtype if device.type == "cuda" else None, [("", torch.no_grad())])
            sync(device)
            runs.append(time.perf_counter() - started)
            assert [p.name for p in result.paths] == [f"p-{name}.mp4"]
            print(f"  {name} render {i}: {runs[-1]:.1f} s", flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        times[name] = {"first": runs[0], "warm": sum(runs[1:]) / len(runs[1:]), "peak": peak}
    return times


def train_and_eval_times(transformer, cfg, tiny: bool, device, dtype, steps: int) -> tuple[float, float]:
    """(seconds per training step, seconds of one eval-loss pass at the defaults) on the same model: the trainer's
    training_step with its optimizer, and eval_samples x eval_buckets no-grad forwards (what trainer.loop.eval_loss runs)."""
    import torch

    from trainer.config.outputs import ValidationConfig
    from trainer.loop.optim import make_optimizer
    from trainer.loop.training_step import training_step
    from trainer.model.lora import trainable_parameters

    frames, h, w = (3, 8, 8) if tiny else (21, 60, 104)
    text_dim = 32 if tiny else 4096
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 16, frames, h, w, generator=g).to(device),
             "text": torch.randn(1, 512, text_dim, generator=g).to(device, dtype)}
    params = trainable_parameters(transformer)
    optimizer = make_optimizer(params, cfg.optim, device)
    generator = torch.Generator(device=device).manual_seed(0)
    transformer.train()
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with autocast:
            loss = training_step(transformer, batch, cfg, generator, device, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: compile
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    per_step = (time.perf_counter() - started) / steps
    defaults = ValidationConfig()
    forwards = defaults.eval_samples * defaults.eval_buckets
    transformer.eval()
    t = torch.full((1,), 500.0, device=device)
    with torch.no_grad(), autocast:
        transformer(hidden_states=batch["latents"].to(dtype), timestep=t, encoder_hidden_states=batch["text"],
                    return_dict=False)
        sync(device)
        started = time.perf_counter()
        for _ in range(forwards):
            transformer(hidden_states=batch["latents"].to(dtype), timestep=t, encoder_hidden_states=batch["text"],
                        return_dict=False)
        sync(device)
    transformer.train()
    return per_step, time.perf_counter() - started


def default_share(step_s: float, validation_s: float, eval_s: float) -> dict:
    """A default run's wall time (config defaults: max_train_steps, validation every_n_steps / at_end, eval every N
    and at the end), and the part validation and eval loss take of it. Caching is left out."""
    from trainer.config.outputs import ValidationConfig
    from trainer.config.training import TrainConfig

    steps, v = TrainConfig().max_train_steps, ValidationConfig()
    rounds = (steps // v.every_n_steps if v.every_n_steps else 0) + (1 if v.at_end and (
        not v.every_n_steps or steps % v.every_n_steps) else 0)
    evals = (steps // v.eval_every_n_steps + (1 if steps % v.eval_every_n_steps else 0)) if v.eval_every_n_steps else 0
    train_s = steps * step_s
    total = train_s + rounds * validation_s + evals * eval_s
    return {"steps": steps, "rounds": rounds, "evals": evals, "train_s": train_s, "validation_share":
            rounds * validation_s / total, "eval_share": evals * eval_s / total, "total_s": total}


def metrics_share(path: Path) -> dict:
    """The same share read from a run's metrics.jsonl: training time from s_per_step x the steps each record covers,
    validation_s and eval_s as the trainer recorded them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_s, previous = 0.0, 0
    for r in rows:
        if "s_per_step" in r:
            train_s += r["s_per_step"] * (r["step"] - previous)
            previous = r["step"]
    validation = sum(r.get("validation_s", 0.0) for r in rows)
    evals = sum(r.get("eval_s", 0.0) for r in rows)
    rounds = sum("validation_videos" in r for r in rows)
    if rounds and not any("validation_s" in r for r in rows):
        raise SystemExit(f"{path}: its validation records carry no validation_s (a run from before the trainer timed "
                         "them): rerun with this version")
    total = train_s + validation + evals
    return {"steps": previous, "rounds": rounds, "evals": sum("eval_loss" in r for r in rows), "train_s": train_s,
            "validation_share": validation / total if total else 0.0, "eval_share": evals / total if total else 0.0,
            "total_s": total}


def share_rows(share: dict, source: str) -> str:
    return (f"| {source} | {share['steps']} | {share['rounds']} | {share['evals']} | {share['total_s'] / 60:.1f} | "
            f"{100 * share['validation_share']:.1f}% | {100 * share['eval_share']:.1f}% |\n")


SHARE_HEAD = ("| wall time of | steps | validation rounds | eval passes | minutes (no caching) | validation | eval loss |\n"
              "|---|---|---|---|---|---|---|\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny Wan on the CPU: the same code path, seconds")
    parser.add_argument("--repeats", type=int, default=1, help="timed renders of each kind after the first (default 1)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps for the share (default 5)")
    parser.add_argument("--full-steps", type=int, default=FULL_STEPS, help=f"steps of the full render ({FULL_STEPS})")
    parser.add_argument("--speed-steps", type=int, default=SPEED_STEPS, help=f"steps with the adapter ({SPEED_STEPS})")
    parser.add_argument("--metrics", type=Path, help="a run's metrics.jsonl: print its validation / eval share only")
    parser.add_argument("--out", type=Path, help="also write the markdown rows here")
    args = parser.parse_args(argv)
    if args.metrics is not None:
        text = SHARE_HEAD + share_rows(metrics_share(args.metrics), f"the run in {args.metrics.parent.name}")
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0

    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    out = Path(tempfile.mkdtemp(prefix="validation-speed-"))
    transformer, vae, text_dim, cfg = build(args.tiny, device, dtype)
    times = render_times(transformer, vae, text_dim, args.tiny, device, dtype, args.repeats, out, args.full_steps,
                         args.speed_steps)
    step_s, eval_s = train_and_eval_times(transformer, cfg, args.tiny, device, dtype, args.train_steps)
    full, speed = times["full"], times["speed"]
    gpu = torch.cuda.get_device_name() if cuda else "cpu (--tiny: checks the script, not a timing)"
    shape = "tiny 32x32x5" if args.tiny else "Wan 2.1 1.3B shape, random weights, 832x480x81"
    text = (f"device: {gpu}; torch {torch.__version__}; {shape}; run LoRA r16 (preset "
            f"{cfg.memory.preset}); speed adapter: random LoRA r{SPEED_RANK} on every block linear, loaded from a "
            f"ComfyUI-named file each render; UniPC shift 5; decoded and written to mp4\n\n"
            "| render | steps | CFG | first render s (compiles) | s / video after it | vs 40 steps | peak GiB |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| full | {args.full_steps} | {FULL_CFG:g} | {full['first']:.1f} | {full['warm']:.1f} | 1.00x | {full['peak']:.1f} |\n"
            f"| speed LoRA | {args.speed_steps} | {SPEED_CFG:g} | {speed['first']:.1f} | {speed['warm']:.1f} | "
            f"{full['warm'] / speed['warm']:.1f}x faster | {speed['peak']:.1f} |\n\n"
            f"training step {step_s:.2f} s, one eval-loss pass {eval_s:.1f} s (measured on the same model)\n\n"
            + SHARE_HEAD
            + share_rows(default_share(step_s, full["warm"], eval_s), "a default run, full render")
            + share_rows(default_share(step_s, speed["warm"], eval_s), "a default run, speed render instead"))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
