"""TREAD speed at the Wan 2.1 1.3B shape: s/step with no routing, one 0.1 route, and a five-route progressive config.

Random weights, bf16 base, LoRA r16 (fp32), batch 1, 832x480x81 (32,760 tokens), the trainer's own LoRA and memory
code (gradient checkpointing as `--checkpointing` says, attention backend "auto"), AdamW on the LoRA. All three
configs run in one process on the same model; prints a markdown table.

    PYTHONPATH=/tmp/site:$PWD python3 bench/tread_bench.py            # on the GPU machine
    python bench/tread_bench.py --tiny --steps 2 --warmup 1           # logic check on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config.model import LoraConfig, MemoryConfig
from trainer.config.training import TreadConfig
from trainer.loop.tread import TokenRouter, kept_count
from trainer.model.lora import trainable_parameters
from trainer.model.trainable import make_trainable

CONFIGS = {
    "no TREAD": [],
    "one route 0.1 (blocks 2..-2)": [(0.1, 2, -2)],
    "five routes 0.1/0.25/0.4/0.25/0.1": [(0.1, 2, 8), (0.25, 9, 11), (0.4, 12, 15), (0.25, 16, 23), (0.1, 24, -2)],
}


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    if tiny:  # 30 blocks like the 1.3B so every route resolves; everything else small
        kw = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=30, text_dim=32, freq_dim=32)
        latents, text = (1, 16, 3, 8, 12), (1, 16, 32)
    else:  # Wan2.1-T2V-1.3B
        kw = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096, freq_dim=256)
        latents, text = (1, 16, 21, 60, 104), (1, 512, 4096)
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads", eps=1e-6, **kw)
    keep = set(model._keep_in_fp32_modules)  # as from_pretrained(torch_dtype=bf16) leaves them: rope, norms in fp32
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model, latents, text


def tread_config(routes) -> TreadConfig:
    return TreadConfig.model_validate(
        {"routes": [{"selection_ratio": r, "start_layer_idx": s, "end_layer_idx": e} for r, s, e in routes]}
    )


def mean_kept_fraction(routes, num_layers: int, tokens: int) -> float:
    """Token-layers processed, as a fraction of the full model's."""
    from trainer.loop.tread import resolve_routes

    work = float(num_layers)
    for r in resolve_routes(tread_config(routes), num_layers):
        work -= (r.end - r.start + 1) * (1 - kept_count(tokens, r.ratio) / tokens)
    return work / num_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU (checks the script, not a benchmark)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", default=MemoryConfig().gradient_checkpointing, choices=["full", "selective", "none"])
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, latent_shape, text_shape = build(args.tiny, device, dtype)
    make_trainable(model, LoraConfig(rank=16), MemoryConfig(gradient_checkpointing=args.checkpointing), device)
    model.train()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(latent_shape, generator=g, device=device)
    text = torch.randn(text_shape, generator=g, device=device).to(dtype)
    tokens = latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(router) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        s = torch.rand(1, generator=g, device=device)
        noise = torch.randn(latent_shape, generator=g, device=device)
        noisy = (1 - s) * latents + s * noise
        if router is not None:
            router.plan(noisy.shape, g)
        with autocast:
            pred = model(hidden_states=noisy.to(dtype), timestep=s * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for name, routes in CONFIGS.items():
        router = TokenRouter(model, tread_config(routes)) if routes else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step(router)
        times = [step(router) for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        if router is not None:
            router.remove()
        rows.append((name, statistics.median(times), min(times), peak, mean_kept_fraction(routes, 30, tokens)))
        print(f"{name}: median {rows[-1][1]:.3f} s/step", flush=True)

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny, not a benchmark)"
    print(f"\n{gpu}, torch {torch.__version__}, {'tiny' if args.tiny else '1.3B 832x480x81'}, batch 1, LoRA r16, "
          f"checkpointing {args.checkpointing}, {args.steps} timed steps after {args.warmup} warmup\n")
    print("| config | s/step (median) | s/step (min) | speedup | peak GiB | token-layers processed |")
    print("|---|---|---|---|---|---|")
    base = rows[0][1]
    for name, med, best, peak, frac in rows:
        print(f"| {name} | {med:.3f} | {best:.3f} | {base / med:.2f}x | {peak:.1f} | {frac:.0%} |")


if __name__ == "__main__":
    main()
