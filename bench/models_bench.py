"""s/step and peak memory of the bigger Wan models through the trainer's own step code (random weights, real shapes).

Rows: Wan 2.1 I2V 14B at 832x480x81 (36 input channels + CLIP tokens) and Wan 2.2 TI2V-5B at 1280x704x121 (48-channel
latents, per-token timesteps, first frame out of the loss). Each row: the real-shape WanTransformer3DModel in bf16,
the trainer's LoRA (rank 16, default targets), memory options (gradient checkpointing), AdamW, and per step the
trainer's inputs (trainer.data.conditioning.transformer_inputs), timesteps (trainer.model.experts) and loss, batch 1.
Latents / conditioning / text embeddings are random tensors of the cached shapes (the VAE, CLIP and UMT5 run only
when caching, never per step).

    PYTHONPATH=/tmp/site:$PWD python3 bench/models_bench.py                # both rows, full checkpointing
    PYTHONPATH=/tmp/site:$PWD python3 bench/models_bench.py --checkpointing selective --steps 6
    PYTHONPATH=$PWD python3 bench/models_bench.py --tiny                   # CPU logic check with tiny shapes
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {  # flavour -> (width, height, frames) of the benchmark
    "i2v-480p-14b-2.1": (832, 480, 81),
    "ti2v-5b-2.2": (1280, 704, 121),
}
CLIP_TOKENS, CLIP_DIM, TEXT_DIM, TEXT_LEN = 257, 1280, 4096, 512


def transformer_config(flavour, tiny: bool) -> dict:
    heads = 2 if tiny else flavour.dim // 128
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16 if tiny else 128,
               in_channels=flavour.in_channels, out_channels=flavour.latent_channels, text_dim=32 if tiny else TEXT_DIM,
               freq_dim=64 if tiny else 256, ffn_dim=64 if tiny else flavour.ffn_dim,
               num_layers=2 if tiny else flavour.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
               eps=1e-6, rope_max_seq_len=1024)
    if flavour.image_encoder:
        cfg.update(image_dim=32 if tiny else CLIP_DIM, added_kv_proj_dim=heads * cfg["attention_head_dim"])
    return cfg


def run_row(name: str, size: tuple[int, int, int], steps: int, checkpointing: str, device: torch.device,
            tiny: bool) -> dict:
    from diffusers import WanTransformer3DModel

    from trainer.config.model import LoraConfig, MemoryConfig, ModelConfig
    from trainer.config.training import FlowConfig, OptimConfig
    from trainer.data.conditioning import loss_region, transformer_inputs
    from trainer.flavours import get_flavour
    from trainer.loop.flow import sample_training_sigmas
    from trainer.loop.flow import flow_loss, flow_target, noisy_input, timesteps_from_sigmas
    from trainer.loop.optim import make_optimizer
    from trainer.model.lora import trainable_parameters
    from trainer.model.trainable import make_trainable

    flavour = get_flavour(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width, height, frames = (64, 64, 9) if tiny else size
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in bf16 on the GPU: a 14B fp32 copy would not fit beside it
    try:
        with torch.device(device):
            transformer = WanTransformer3DModel(**transformer_config(flavour, tiny))
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    make_trainable(transformer, LoraConfig(rank=16), MemoryConfig(gradient_checkpointing=checkpointing), device)
    transformer.train()
    optimizer = make_optimizer(trainable_parameters(transformer), OptimConfig(), device)
    model_cfg, flow_cfg = ModelConfig(flavour=name), FlowConfig()

    lat_t, lat_h, lat_w = (frames - 1) // 4 + 1, height // flavour.vae_spatial, width // flavour.vae_spatial
    latents = torch.randn(1, flavour.latent_channels, lat_t, lat_h, lat_w, device=device)
    text = torch.randn(1, TEXT_LEN, transformer.config.text_dim, device=device, dtype=dtype)
    batch: dict[str, torch.Tensor] = {}
    if flavour.task == "i2v":
        batch["condition"] = torch.randn(1, 4 + flavour.latent_channels, lat_t, lat_h, lat_w, device=device)
        if flavour.image_encoder:
            batch["image_embeds"] = torch.randn(1, CLIP_TOKENS, transformer.config.image_dim, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def step() -> float:
        sigmas = sample_training_sigmas(1, flow_cfg, generator, flavour, None)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = noisy_input(latents, noise, sigmas)
        inputs = transformer_inputs(flavour, model_cfg, batch, latents, noisy, timesteps_from_sigmas(sigmas), device,
                                    dtype)
        with autocast:
            prediction = transformer(**inputs, encoder_hidden_states=text, return_dict=False)[0]
        loss = flow_loss(*loss_region(flavour, prediction, flow_target(latents, noise)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    warmup = 1 if tiny else 2
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    tokens = lat_t * (lat_h // 2) * (lat_w // 2)
    params = sum(p.numel() for p in transformer.parameters() if not p.requires_grad) / 1e9
    del transformer, optimizer, batch, latents, text
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"flavour": name, "shape": f"{width}x{height}x{frames}", "tokens": tokens, "params_b": params,
            "checkpointing": checkpointing, "s_per_step": seconds, "peak_gib": peak,
            "loss_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--checkpointing", default="full", choices=["full", "selective", "none"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the logic, times nothing real")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = [run_row(name, ROWS[name], args.steps, args.checkpointing, device, args.tiny) for name in args.rows]
    precision = "bf16" if device.type == "cuda" else "fp32 (tiny CPU check)"
    print(f"\n{gpu}, torch {torch.__version__}, {precision}, LoRA rank 16, batch 1, AdamW, random weights\n")
    print("| flavour | shape | tokens | base params (B) | checkpointing | s/step | peak GiB | loss finite |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['flavour']} | {r['shape']} | {r['tokens']} | {r['params_b']:.2f} | {r['checkpointing']} | "
              f"{r['s_per_step']:.2f} | {r['peak_gib']:.1f} | {r['loss_finite']} |")


if __name__ == "__main__":
    main()
