"""Speed and memory of one LoRA training step at the real Wan shapes, every variant in one process, one table.

Random weights at the real 1.3B / 14B configs (nothing can be downloaded on the GPU machine). Each trainer variant goes
through the trainer's own code: `place_base_model` -> `add_lora` -> `apply_memory_options` -> accelerate prepare ->
`trainer.loop.training_step.training_step` with accelerate backward, clipping and the fused AdamW, on a cached-latent-shaped batch
(832x480x81 -> 16x21x60x104 latents, 512 x 4096 text states). The naive diffusers + peft loop runs in the same process
as the ratio base: bf16 model, `add_adapter`, diffusers' default checkpointing and attention, torch AdamW, loss.item().

    python3 bench/speed_bench.py --model 1.3b --variants all --out $OUT/speed-1.3b.md
    python3 bench/speed_bench.py --model 14b --shape 1280x720x81 --flavour t2v-14b-2.2-high --variants balanced-lean
    python3 bench/speed_bench.py --model 5b --shape 1280x704x121 --flavour ti2v-5b-2.2 --variants naive,fast,balanced
    python3 bench/speed_bench.py --tiny --model 5b --variants naive,full     # CPU check of the logic, tiny shapes
    python3 bench/speed_bench.py --model 14b --variants low-16gb-fa4 --cap-gib 15 --steps 5   # a 16 GB card
    python3 bench/speed_bench.py --model 1.3b --flavour vace-1.3b-2.1 --variants naive,fast,balanced  # VACE 1.3B

`--shape` sets the clip (width x height x frames; latents /8 spatially, /16 with the Wan 2.2 VAE of TI2V-5B,
(frames-1)/4+1 in time), `--flavour` the model the trainer's step is configured for (its input channels: I2V adds 20
condition channels, Wan 2.1 I2V 257 CLIP tokens; TI2V-5B: 48-channel latents, per-token timesteps with the clean first
latent frame at 0 and out of the loss, as diffusers' `expand_timesteps` pipelines feed it; VACE: diffusers'
WanVACETransformer3DModel with the flavour's VACE layers (15 VACE blocks at 1.3B, 8 at 14B) and a 96-channel control
context of the clip's latent shape, as the cache stores it, fed to both loops as control_hidden_states).
Each row also reports host memory: the process's peak resident set (VmHWM), the peak during the timed steps alone
(VmHWM reset through /proc/self/clear_refs once the model is built), the activation offload's pinned pool, and for
weight streaming (`streamed_blocks`) the pinned host RAM of the streamed weights and the GiB they crossed to the GPU in
the last step; run one variant per process (the peak is the process's).
`--cap-gib G` caps this process's CUDA allocator at G GiB (torch.cuda.set_per_process_memory_fraction, which counts
what the allocator reserves, fragmentation included) from the end of the variant's setup: the random model is built
at full size on the GPU first, quantized and placed, then the cap holds for every timed step, as a card of that size
would (the naive loop is capped too).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "5b": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30),
}
TINY = dict(num_attention_heads=2, ffn_dim=64, num_layers=2)  # --tiny: CPU logic check (head_dim 128 kept)
COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
PROFILE = False
FLAVOUR = {"1.3b": "t2v-480p-1.3b-2.1", "14b": "t2v-480p-14b-2.1", "5b": "ti2v-5b-2.2"}
DEFAULT_SHAPE = {"1.3b": "832x480x81", "14b": "832x480x81", "5b": "1280x704x121"}
SHAPE = (832, 480, 81)  # width, height, frames (--shape)
DEVICE = torch.device("cuda")  # --tiny: cpu
CAP_GIB = 0.0  # --cap-gib: the CUDA allocator's cap for the timed steps (0: none)
CLIP_TOKENS, CLIP_DIM = 257, 1280
VACE_CHANNELS = 96  # 16 inactive + 16 reactive latent channels + 64 packed mask channels

# name -> [memory] settings (anything not named keeps the schema default)
VARIANTS: dict[str, dict] = {
    "full": dict(gradient_checkpointing="full"),
    "full-flash": dict(gradient_checkpointing="full", attention_backend="_native_flash"),
    "full-efficient": dict(gradient_checkpointing="full", attention_backend="_native_efficient"),
    "selective": dict(gradient_checkpointing="selective"),
    "selective-compile": dict(gradient_checkpointing="selective", compile=True),
    "none-compile": dict(gradient_checkpointing="none", compile=True),
    "partial20-compile": dict(gradient_checkpointing="selective", checkpointed_blocks=20, compile=True),
    "partial10-compile": dict(gradient_checkpointing="selective", checkpointed_blocks=10, compile=True),
    "int8-full": dict(gradient_checkpointing="full", base_quantization="int8"),
    "full-compile": dict(gradient_checkpointing="full", compile=True),
    "int8-full-compile": dict(gradient_checkpointing="full", base_quantization="int8", compile=True),
    "int8-full-compile-ffchunk": dict(gradient_checkpointing="full", base_quantization="int8", compile=True,
                                      feed_forward_chunk_size=4096),
    "int8-selective-compile": dict(gradient_checkpointing="selective", base_quantization="int8", compile=True),
    "selective-compile-offload": dict(gradient_checkpointing="selective", compile=True, activation_offload=True),
    "partial26-compile-offload": dict(gradient_checkpointing="selective", checkpointed_blocks=26, compile=True,
                                      activation_offload=True),
    "partial24-compile-offload": dict(gradient_checkpointing="selective", checkpointed_blocks=24, compile=True,
                                      activation_offload=True),
    "partial36-compile-offload": dict(gradient_checkpointing="selective", checkpointed_blocks=36, compile=True,
                                      activation_offload=True),
    "int8-selective-compile-offload": dict(gradient_checkpointing="selective", base_quantization="int8", compile=True,
                                           activation_offload=True),
    "selective-compile-offload-ffchunk": dict(gradient_checkpointing="selective", compile=True, activation_offload=True,
                                              feed_forward_chunk_size=8192),
    "int8-selective-compile-offload-ffchunk4k": dict(gradient_checkpointing="selective", base_quantization="int8",
                                                     compile=True, activation_offload=True, feed_forward_chunk_size=4096),
    "selective-compile-offload-sublayers": dict(gradient_checkpointing="selective", compile=True,
                                                activation_offload=True, checkpoint_sublayers=True),
    "selective-compile-offload-sublayers-ffchunk": dict(gradient_checkpointing="selective", compile=True,
                                                        activation_offload=True, checkpoint_sublayers=True,
                                                        feed_forward_chunk_size=8192),
    "int8-selective-compile-offload-ffchunk2k": dict(gradient_checkpointing="selective", base_quantization="int8",
                                                     compile=True, activation_offload=True, feed_forward_chunk_size=2048),
    "int8-selective-compile-offload-ffchunk": dict(gradient_checkpointing="selective", base_quantization="int8",
                                                   compile=True, activation_offload=True, feed_forward_chunk_size=8192),
    "selective-compile-sublayers": dict(gradient_checkpointing="selective", compile=True, checkpoint_sublayers=True),
    "int8-selective-compile-offload-sublayers-ffchunk": dict(
        gradient_checkpointing="selective", base_quantization="int8", compile=True, activation_offload=True,
        checkpoint_sublayers=True, feed_forward_chunk_size=8192),
    "int8-selective-compile-offload-sublayers-ffchunk4k": dict(
        gradient_checkpointing="selective", base_quantization="int8", compile=True, activation_offload=True,
        checkpoint_sublayers=True, feed_forward_chunk_size=4096),
    "selective-compile-fa4": dict(gradient_checkpointing="selective", compile=True, attention_backend="flash_4_hub"),
    "selective-compile-offload-sublayers-fa4": dict(gradient_checkpointing="selective", compile=True,
                                                    activation_offload=True, checkpoint_sublayers=True,
                                                    attention_backend="flash_4_hub"),
    "selective-compile-sublayers-fa4": dict(gradient_checkpointing="selective", compile=True, checkpoint_sublayers=True,
                                            attention_backend="flash_4_hub"),
    "selective-compile-offload-sublayers-ffchunk-fa4": dict(
        gradient_checkpointing="selective", compile=True, activation_offload=True, checkpoint_sublayers=True,
        feed_forward_chunk_size=8192, attention_backend="flash_4_hub"),
    "int8-selective-compile-offload-ffchunk4k-fa4": dict(
        gradient_checkpointing="selective", base_quantization="int8", compile=True, activation_offload=True,
        feed_forward_chunk_size=4096, attention_backend="flash_4_hub"),
    # the next candidates for 1.3B <= 1.7 s within 20 GiB: balanced with the last blocks keeping everything
    "partial24-compile-offload-sublayers-fa4": dict(
        gradient_checkpointing="selective", checkpointed_blocks=24, compile=True, activation_offload=True,
        checkpoint_sublayers=True, attention_backend="flash_4_hub"),
    "partial26-compile-offload-sublayers-fa4": dict(
        gradient_checkpointing="selective", checkpointed_blocks=26, compile=True, activation_offload=True,
        checkpoint_sublayers=True, attention_backend="flash_4_hub"),
    # frozen base weights in fp8 with fp8 matmuls (trainer/fp8.py)
    "fp8-selective-compile-sublayers-fa4": dict(gradient_checkpointing="selective", compile=True,
                                                checkpoint_sublayers=True, base_quantization="fp8",
                                                attention_backend="flash_4_hub"),
    "fp8-selective-compile-offload-sublayers-fa4": dict(
        gradient_checkpointing="selective", compile=True, activation_offload=True, checkpoint_sublayers=True,
        base_quantization="fp8", attention_backend="flash_4_hub"),
    "fp8-selective-compile-offload-sublayers-ffchunk-fa4": dict(
        gradient_checkpointing="selective", compile=True, activation_offload=True, checkpoint_sublayers=True,
        feed_forward_chunk_size=8192, base_quantization="fp8", attention_backend="flash_4_hub"),
    "fp8-partial26-compile-offload-sublayers-fa4": dict(
        gradient_checkpointing="selective", checkpointed_blocks=26, compile=True, activation_offload=True,
        checkpoint_sublayers=True, base_quantization="fp8", attention_backend="flash_4_hub"),
    "fp8-selective-compile-offload-sublayers": dict(
        gradient_checkpointing="selective", compile=True, activation_offload=True, checkpoint_sublayers=True,
        base_quantization="fp8"),
    # big cards (issue 24: 1.3B <= 1.40 s/step on an 80 GB GPU): keep every activation, or checkpoint only some blocks
    "none-compile-fa4": dict(gradient_checkpointing="none", compile=True, attention_backend="flash_4_hub"),
    "fp8-none-compile-fa4": dict(gradient_checkpointing="none", compile=True, base_quantization="fp8",
                                 attention_backend="flash_4_hub"),
    "partial10-compile-fa4": dict(gradient_checkpointing="selective", checkpointed_blocks=10, compile=True,
                                  attention_backend="flash_4_hub"),
    # 14B on a 16 GB card (issue 31): preset low-16gb with fewer / more of the 40 blocks streamed from host RAM
    "low-16gb-s24-fa4": dict(gradient_checkpointing="full", compile=True, activation_offload=True,
                             feed_forward_chunk_size=4096, base_quantization="int8", streamed_blocks=24,
                             attention_backend="flash_4_hub"),
    "low-16gb-s36-fa4": dict(gradient_checkpointing="full", compile=True, activation_offload=True,
                             feed_forward_chunk_size=4096, base_quantization="int8", streamed_blocks=36,
                             attention_backend="flash_4_hub"),
    # issue 31: fp8 where the 80 GB card has room to keep activations (only the first 10 blocks checkpointed), and
    # fp8 on the 720p A14B preset (balanced-lean: no sub-layers, so the offload fits 128 GiB of host RAM)
    "fp8-partial10-compile-sublayers-fa4": dict(gradient_checkpointing="selective", checkpointed_blocks=10,
                                                compile=True, checkpoint_sublayers=True, base_quantization="fp8",
                                                attention_backend="flash_4_hub"),
    "fp8-balanced-lean-fa4": dict(gradient_checkpointing="selective", compile=True, activation_offload=True,
                                  base_quantization="fp8", attention_backend="flash_4_hub"),
}
# the presets by name (trainer/model/presets.py), cuDNN attention unless the name ends in -fa4
for _name, _values in __import__("trainer.model.presets", fromlist=["PRESETS"]).PRESETS.items():
    VARIANTS.setdefault(_name, {**_values, "attention_backend": "_native_cudnn"})
    VARIANTS.setdefault(f"{_name}-fa4", {**_values, "attention_backend": "flash_4_hub"})


def latent_shape(spatial: int = 8) -> tuple[int, int, int]:
    """(frames, height, width) of the latent of SHAPE for a VAE with this spatial factor."""
    width, height, frames = SHAPE
    return (frames - 1) // 4 + 1, height // spatial, width // spatial


def vace_layers(model: str, flavour: str) -> list[int]:
    """The flavour's VACE layers that exist in the model being built (--tiny has 2 blocks); [] for other flavours."""
    from trainer.flavours import get_flavour

    return [i for i in get_flavour(flavour).vace_layers if i < SHAPES[model]["num_layers"]]


def step_flops(model: str, frames: int = 81, height: int = 480, width: int = 832, text_len: int = 512,
               spatial: int = 8, extra_blocks: int = 0) -> float:
    """Useful FLOPs of one training step (forward + input-gradient backward; frozen base, LoRA negligible, no recompute).
    `extra_blocks`: VACE blocks, each a Wan block over as many tokens (their hint projections left out)."""
    s = SHAPES[model]
    d = s["num_attention_heads"] * 128
    n = ((frames - 1) // 4 + 1) * (height // (2 * spatial)) * (width // (2 * spatial))
    linear = 2 * n * (4 * d * d + 2 * d * d + 2 * d * s["ffn_dim"]) + 2 * text_len * 2 * d * d
    attention = 4 * n * n * d + 4 * n * text_len * d
    blocks = s["num_layers"] + extra_blocks
    forward = blocks * (linear + attention)
    backward = blocks * (linear + 2.5 * attention)  # input grads only; flash-style attention backward
    return forward + backward


def build_transformer(model: str, flavour: str):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    from trainer.flavours import get_flavour

    f = get_flavour(flavour)
    shape = SHAPES[model]
    extra = dict(in_channels=f.in_channels, out_channels=f.latent_channels)
    if f.image_encoder:
        extra.update(image_dim=CLIP_DIM, added_kv_proj_dim=shape["num_attention_heads"] * 128)
    cls = WanTransformer3DModel
    if f.is_vace:
        cls = WanVACETransformer3DModel
        extra.update(vace_layers=vace_layers(model, flavour), vace_in_channels=VACE_CHANNELS)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = cls(**{**COMMON, **extra}, **shape).to(torch.bfloat16)
    # as `from_pretrained(torch_dtype=bfloat16)` loads it in the trainer: diffusers keeps these modules in fp32
    for name, param in model.named_parameters():
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    return model


def make_batch(flavour: str) -> dict:
    from trainer.flavours import get_flavour

    f = get_flavour(flavour)
    frames, h, w = latent_shape(f.vae_spatial)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, f.latent_channels, frames, h, w, generator=g),
             "text": torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16)}
    if f.is_vace:  # the control context as the cache stores it (no reference images: the clip's latent frames)
        batch["vace_context"] = torch.randn(1, VACE_CHANNELS, frames, h, w, generator=g)
    if f.task == "i2v":  # 4 mask + 16 first-frame latent channels, as the cache stores them
        batch["condition"] = torch.randn(1, f.in_channels - 16, frames, h, w, generator=g)
        if f.image_encoder:
            batch["image_embeds"] = torch.randn(1, CLIP_TOKENS, CLIP_DIM, generator=g).to(torch.bfloat16)
    return {k: v.pin_memory() for k, v in batch.items()} if DEVICE.type == "cuda" else batch


def host_status() -> dict:
    """Peak and current resident set of this process (GiB) from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024 / 2**30
    return fields


def timed_steps(step, warmup: int, steps: int) -> list[float]:
    """Seconds per step from CUDA events, with no host sync inside the loop (as in the trainer, which reads the loss only
    at log intervals): the CPU runs ahead and each step's time is the GPU's, launch gaps included. CPU: wall clock."""
    if DEVICE.type != "cuda":
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(warmup + steps + 1)]
    for i in range(warmup + steps):
        events[i].record()
        step()
        if i < warmup:  # warm-up steps compile; show them as they finish
            torch.cuda.synchronize()
            print(f"  warm-up step {i} done", flush=True)
    events[-1].record()
    torch.cuda.synchronize()
    times = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(warmup, warmup + steps)]
    print("  steps: " + " ".join(f"{t:.3f}" for t in times), flush=True)
    return times


def reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def reset_host_peak() -> bool:
    """Start VmHWM again from the current resident set (Linux: 5 > /proc/self/clear_refs); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def apply_cap() -> None:
    """--cap-gib: from now on the CUDA allocator reserves at most CAP_GIB (what it caches is given back first)."""
    if DEVICE.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        cap = CAP_GIB * 2**30 / torch.cuda.get_device_properties(DEVICE).total_memory if CAP_GIB else 1.0
        torch.cuda.set_per_process_memory_fraction(min(cap, 1.0))


def peak_gib() -> float:
    """GPU peak allocated since reset_peak (nan on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")


def run_trainer_variant(model: str, flavour: str, memory: dict, warmup: int, steps: int) -> dict:
    from accelerate import Accelerator

    from trainer.config.files import config_from_dict
    from trainer.loop.optim import make_optimizer
    from trainer.loop.training_step import training_step
    from trainer.model.lora import trainable_parameters
    from trainer.model.trainable import make_trainable

    cfg = config_from_dict({"model": {"flavour": flavour}, "memory": {"preset": "none", **memory},
                            "datasets": [{"path": "/tmp"}], "lora": {"rank": 16}}, source="bench")
    device = DEVICE
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    transformer = build_transformer(model, flavour)
    torch.manual_seed(0)  # the same LoRA init for every variant
    offloader = make_trainable(transformer, cfg.lora, cfg.memory, device)
    transformer.train()
    params = trainable_parameters(transformer)
    optimizer = make_optimizer(params, cfg.optim, device)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = make_batch(flavour)
    apply_cap()
    reset_peak()
    host_reset = reset_host_peak()
    first: dict = {}

    def step() -> None:
        loss = training_step(transformer, batch, cfg, generator, device, torch.bfloat16)
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not first:  # same seed, batch and initial LoRA in every variant: exact options agree here
            first.update(loss=loss.item(), grad_norm=float(norm))

    times = timed_steps(step, warmup, steps)
    peak = peak_gib()
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90))
    offloaded = offloader.bytes_offloaded / 2**30 if offloader else 0.0
    host = {"pinned": offloader.pool.bytes / 2**30 if offloader else 0.0,
            "kept": offloader.bytes_kept_for_lack_of_host / 2**30 if offloader else 0.0,
            "budget": (offloader.max_host_bytes or 0) / 2**30 if offloader else 0.0,
            "steps_host_peak": host_status()["VmHWM"] if host_reset else float("nan")}
    from trainer.model.streaming import weight_streamer

    streamer = weight_streamer(transformer)
    if streamer is not None:
        host.update(streamed=streamer.host_bytes / 2**30, streamed_per_step=streamer.bytes_copied / 2**30,
                    streamed_blocks=len(streamer.ids))
    del transformer, optimizer, accelerator, streamer
    return {"times": times, "peak": peak, "offloaded": offloaded, **host, **first}


def run_naive(model: str, flavour: str, warmup: int, steps: int) -> dict:
    """The loop a user writes from the diffusers + peft docs: the ratio base."""
    import torch.nn.functional as F
    from peft import LoraConfig

    from trainer.config.model import DEFAULT_TARGET_MODULES
    from trainer.flavours import get_flavour

    ti2v = get_flavour(flavour).expand_timesteps

    transformer = build_transformer(model, flavour)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=DEFAULT_TARGET_MODULES))
    transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = {k: v.to(DEVICE) for k, v in make_batch(flavour).items()}
    apply_cap()
    reset_peak()
    host_reset = reset_host_peak()

    def step() -> None:
        x0 = batch["latents"].to(torch.bfloat16)
        noise = torch.randn_like(x0)
        s = torch.rand(1, device=DEVICE)
        noisy = ((1 - s) * x0 + s * noise).to(torch.bfloat16)
        timestep = s * 1000
        extra = {"encoder_hidden_states_image": batch["image_embeds"]} if "image_embeds" in batch else {}
        if "vace_context" in batch:  # WanVACEPipeline's control_hidden_states
            extra["control_hidden_states"] = batch["vace_context"].to(torch.bfloat16)
        if "condition" in batch:
            noisy = torch.cat([noisy, batch["condition"].to(torch.bfloat16)], dim=1)
        if ti2v:  # as WanPipeline's expand_timesteps: clean first latent frame, one timestep per patch token
            mask = torch.ones_like(x0[:, :1])
            mask[:, :, 0] = 0
            noisy = (1 - mask) * x0 + mask * noisy
            timestep = (mask[0, 0][:, ::2, ::2].flatten() * timestep).unsqueeze(0)
        pred = transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=batch["text"],
                           return_dict=False, **extra)[0]
        first = 1 if ti2v else 0  # the given first frame is not learned
        loss = F.mse_loss(pred[:, :, first:].float(), (noise - x0)[:, :, first:].float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    times = timed_steps(step, warmup, steps)
    peak = peak_gib()
    del transformer, optimizer
    return {"times": times, "peak": peak, "offloaded": 0.0, "pinned": 0.0, "kept": 0.0, "budget": 0.0,
            "steps_host_peak": host_status()["VmHWM"] if host_reset else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(SHAPES), default="1.3b")
    parser.add_argument("--variants", default="all", help="comma list of: naive," + ",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per variant")
    parser.add_argument("--shape", default=None, help="clip width x height x frames (default: the model's own)")
    parser.add_argument("--flavour", default=None, help="the flavour the step is configured for (default: the model's; "
                        "a VACE flavour, e.g. vace-1.3b-2.1, builds the VACE model)")
    parser.add_argument("--tiny", action="store_true", help="CPU, 2 tiny blocks, 64x64x9: checks the logic only")
    parser.add_argument("--cap-gib", type=float, default=0.0,
                        help="cap the CUDA allocator at this many GiB for the timed steps (a smaller card)")
    args = parser.parse_args()
    global PROFILE, SHAPE, DEVICE, CAP_GIB
    PROFILE = args.profile
    CAP_GIB = args.cap_gib
    if args.tiny:
        DEVICE = torch.device("cpu")
        SHAPES[args.model] = TINY
        args.shape = "64x64x9"
        for values in VARIANTS.values():  # the GPU kernels do not run on the CPU: torch's own attention
            values["attention_backend"] = "native"
    args.shape = args.shape or DEFAULT_SHAPE[args.model]
    SHAPE = tuple(int(v) for v in args.shape.lower().split("x"))
    flavour = args.flavour or FLAVOUR[args.model]
    import diffusers

    from trainer.flavours import get_flavour
    from trainer.model.sizing import host_memory_gib

    names = ["naive", *VARIANTS] if args.variants == "all" else args.variants.split(",")
    width, height, frames = SHAPE
    spatial = get_flavour(flavour).vae_spatial
    flops = step_flops(args.model, frames, height, width, spatial=spatial,
                       extra_blocks=len(vace_layers(args.model, flavour)))
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (--tiny: logic check, not a timing)"
    tokens = "x".join(str(n // p) for n, p in zip(latent_shape(spatial), (1, 2, 2)))
    header = (f"device: {device}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
              f"Wan {args.model} ({flavour}) {args.shape}, {tokens} tokens, "
              f"batch 1, LoRA r16, bf16; useful FLOP/step {flops:.3e}; median of {args.steps} steps after "
              f"{args.warmup} warm-up; host RAM available at start {host_memory_gib():.1f} GiB"
              + (f"; CUDA allocator capped at {CAP_GIB:g} GiB for the steps" if CAP_GIB else "") + "\n\n"
              "| variant | median s/step | peak GiB | offloaded GiB/step | TFLOP/s (useful) | vs naive | "
              "step-0 loss / grad norm | host peak GiB (VmHWM) | host peak GiB in the steps | pinned pool GiB | "
              "kept on GPU for lack of host GiB | streamed blocks: host GiB / GiB to the GPU per step |"
              "\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows, naive_time = [], None
    for name in names:
        print(f"== {name}", flush=True)
        if DEVICE.type == "cuda":  # the cap holds for the timed steps only (apply_cap): lifted while building
            torch.cuda.set_per_process_memory_fraction(1.0)
        try:
            if name == "naive":
                r = run_naive(args.model, flavour, args.warmup, args.steps)
            else:
                r = run_trainer_variant(args.model, flavour, VARIANTS[name], args.warmup, args.steps)
            median = statistics.median(r["times"])
            naive_time = median if name == "naive" else naive_time
            ratio = f"{naive_time / median:.2f}x" if naive_time else "-"
            check = f"{r['loss']:.5f} / {r['grad_norm']:.4e}" if "loss" in r else "-"
            streamed = (f"{r['streamed_blocks']}: {r['streamed']:.2f} / {r['streamed_per_step']:.2f}"
                        if "streamed" in r else "-")
            rows.append(f"| {name} | {median:.3f} | {r['peak']:.2f} | {r['offloaded']:.2f} | "
                        f"{flops / median / 1e12:.0f} | {ratio} | {check} | {host_status()['VmHWM']:.2f} | "
                        f"{r['steps_host_peak']:.2f} | {r['pinned']:.2f} | {r['kept']:.2f} | {streamed} |")
        except Exception as err:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            rows.append(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | "
                        f"{peak_gib():.2f} (at failure) | | | | | "
                        f"{host_status()['VmHWM']:.2f} | | | | |")
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        print(rows[-1], flush=True)
        if args.out:
            args.out.write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))


if __name__ == "__main__":
    main()
