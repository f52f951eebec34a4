"""Memory presets: named `[memory]` settings, and "auto", which picks the fastest one whose measured peak fits the GPU.

The peaks are measured on an H100 at 832x480x81, batch 1, LoRA r16 (bench/RESULTS.md, bench/speed_bench.py); for other
clip shapes the activation part is scaled by the token count. Fields the user set in `[memory]` always win.
"""

from __future__ import annotations

import logging

from trainer.config import MemoryConfig
from trainer.flavours import Flavour

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    "fast": {"gradient_checkpointing": "selective", "compile": True},
    "balanced": {"gradient_checkpointing": "full", "compile": True},
    "low": {"gradient_checkpointing": "full", "compile": True, "base_quantization": "int8"},
}
MEASURED_TOKENS = 21 * 30 * 52  # 832x480x81 after the VAE and 2x2 patching
# peak GiB (torch max_memory_allocated) by transformer width, then preset: bench/RESULTS.md
MEASURED_PEAK_GIB: dict[int, dict[str, float]] = {
    1536: {"fast": 13.71, "balanced": 11.70, "low": 10.41},
    5120: {"fast": 62.76, "balanced": 52.89, "low": 39.80},
}
HEADROOM = 0.92  # leave room for the allocator's fragmentation and the CUDA context


def _params_billion(f: Flavour) -> float:
    per_layer = 4 * f.dim * f.dim + 4 * f.dim * f.dim + 2 * f.dim * f.ffn_dim  # self-attn, cross-attn, ffn
    return f.num_layers * per_layer / 1e9


def estimated_peak_gib(f: Flavour, preset: str, tokens: int, batch: int = 1) -> float:
    """Measured peak for the nearest measured width, weights rescaled to this model, activations to its tokens."""
    width = min(MEASURED_PEAK_GIB, key=lambda w: abs(w - f.dim))
    ref = _reference_flavour_params(width)
    bytes_per_weight = 1 if PRESETS[preset].get("base_quantization") == "int8" else 2
    ref_weights = ref[0] * bytes_per_weight * 1e9 / 2**30
    activations = (MEASURED_PEAK_GIB[width][preset] - ref_weights) * (f.dim * f.num_layers) / (width * ref[1])
    weights = _params_billion(f) * bytes_per_weight * 1e9 / 2**30
    return weights + activations * tokens * batch / MEASURED_TOKENS


def _reference_flavour_params(width: int) -> tuple[float, int]:
    from trainer.flavours import FLAVOURS

    ref = next(f for f in FLAVOURS.values() if f.dim == width and f.hub_id)
    return _params_billion(ref), ref.num_layers


def flavour_tokens(f: Flavour) -> int:
    latent_frames = (f.num_frames - 1) // 4 + 1
    return latent_frames * (f.height // (f.vae_spatial * 2)) * (f.width // (f.vae_spatial * 2))


def choose_preset(f: Flavour, gpu_gib: float, tokens: int | None = None, batch: int = 1) -> str:
    tokens = tokens or flavour_tokens(f)
    for name in PRESETS:
        if estimated_peak_gib(f, name, tokens, batch) <= HEADROOM * gpu_gib:
            return name
    log.warning("no memory preset is expected to fit %.0f GiB for %s; using \"low\"", gpu_gib, f.name)
    return "low"


def resolve_memory(cfg: MemoryConfig, f: Flavour, gpu_gib: float | None, tokens: int | None = None,
                   batch: int = 1) -> MemoryConfig:
    """The [memory] settings to train with: the preset's values under the fields the user set explicitly."""
    if cfg.preset == "none" or (cfg.preset == "auto" and not gpu_gib):
        return cfg
    name = cfg.preset
    if name == "auto":
        name = choose_preset(f, gpu_gib, tokens, batch)
        log.info("memory preset auto -> %s (%.0f GiB GPU)", name, gpu_gib)
    explicit = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "preset"}
    return MemoryConfig(**{**PRESETS[name], **explicit, "preset": cfg.preset})
