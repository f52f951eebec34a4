"""Memory presets: named `[memory]` settings, and "auto", which picks the fastest one whose measured peak fits the GPU.

The peaks are measured on an H100 at 832x480x81, batch 1, LoRA r16 (bench/RESULTS.md, bench/speed_bench.py); for other
clip shapes the activation part is scaled by the token count. Fields the user set in `[memory]` always win.
"""

from __future__ import annotations

import logging

from trainer.config import MemoryConfig
from trainer.flavours import Flavour

log = logging.getLogger(__name__)

# In the order `auto` tries them: the fastest first (measured on the H100, bench/RESULTS.md). "balanced" is first
# because checkpointing each block's three sub-layers separately saves recompute and the offload hides behind compute:
# with FlashAttention 4 it is the fastest (1.3B 1.753 vs 1.795 s/step for "fast", 14B 8.82 vs 9.03) and needs far
# less GPU memory, but it holds host RAM; "fast" is for machines without that RAM to spare.
PRESETS: dict[str, dict] = {
    "balanced": {"gradient_checkpointing": "selective", "compile": True, "activation_offload": True,
                 "checkpoint_sublayers": True},
    "fast": {"gradient_checkpointing": "selective", "compile": True},
    # balanced without sub-layer checkpointing: half its host RAM (the block input and the attention output per
    # block), a little more recompute; what fits 14B at 1280x720x81 on an 80 GB GPU with 128 GiB of host RAM
    "balanced-lean": {"gradient_checkpointing": "selective", "compile": True, "activation_offload": True},
    "low": {"gradient_checkpointing": "selective", "compile": True, "activation_offload": True,
            "checkpoint_sublayers": True, "feed_forward_chunk_size": 8192},
    # no sublayer checkpointing here: it doubles the host RAM the offload holds (50 GiB at 14B), and 24 GB cards
    # usually come with little host RAM
    "low-int8": {"gradient_checkpointing": "selective", "compile": True, "activation_offload": True,
                 "feed_forward_chunk_size": 4096, "base_quantization": "int8"},
    # for machines without the host RAM to offload into
    "low-host-ram": {"gradient_checkpointing": "full", "compile": True, "base_quantization": "int8"},
    # balanced with fp8 base weights and fp8 matmuls: the fastest measured step, but fp8 changes the numbers (~3%
    # relative error per matmul), so it is opt-in: `auto` never picks it
    "balanced-fp8": {"gradient_checkpointing": "selective", "compile": True, "activation_offload": True,
                     "checkpoint_sublayers": True, "base_quantization": "fp8"},
}
OPT_IN = {"balanced-fp8"}
MEASURED_TOKENS = 21 * 30 * 52  # 832x480x81 after the VAE and 2x2 patching
# H100, 832x480x81, batch 1, r16, by transformer width then preset (bench/RESULTS.md, bench/speed_bench.py), cuDNN
# attention (FlashAttention 4's peaks are the same or up to 0.6 GiB lower; balanced-fp8 was measured with it): peak GiB (torch max_memory_allocated) and
# host GiB the activation offload copies per step.
MEASURED_PEAK_GIB: dict[int, dict[str, float]] = {
    1536: {"fast": 13.72, "balanced": 7.94, "balanced-lean": 8.52, "low": 5.24, "low-int8": 4.13, "low-host-ram": 10.41, "balanced-fp8": 8.77},
    5120: {"fast": 62.76, "balanced": 37.27, "balanced-lean": 39.17, "low": 34.81, "low-int8": 21.91, "low-host-ram": 39.80, "balanced-fp8": 38.55},
}
MEASURED_OFFLOAD_GIB: dict[int, dict[str, float]] = {
    1536: {"fast": 0.0, "balanced": 11.41, "balanced-lean": 5.97, "low": 11.41, "low-int8": 5.97, "low-host-ram": 0.0, "balanced-fp8": 11.41},
    5120: {"fast": 0.0, "balanced": 49.73, "balanced-lean": 25.36, "low": 49.73, "low-int8": 25.36, "low-host-ram": 0.0, "balanced-fp8": 49.73},
}
HOST_SHARE = 0.6  # offload may use at most this share of the free host RAM (dataloader, page cache, the rest)
HEADROOM = 0.92  # leave room for the allocator's fragmentation and the CUDA context


def _params_billion(f: Flavour) -> float:
    per_layer = 4 * f.dim * f.dim + 4 * f.dim * f.dim + 2 * f.dim * f.ffn_dim  # self-attn, cross-attn, ffn
    return f.num_layers * per_layer / 1e9


def _bytes_per_weight(quantization: str) -> int:
    return 1 if quantization == "int8" else 2  # fp8 keeps two 1-byte copies (forward and input-gradient layouts)


def estimated_peak_gib(f: Flavour, preset: str, tokens: int, batch: int = 1,
                       base_quantization: str | None = None) -> float:
    """Measured peak for the nearest measured width, weights rescaled to this model, activations to its tokens.
    `base_quantization` is the user's own setting where it overrides the preset's."""
    width = min(MEASURED_PEAK_GIB, key=lambda w: abs(w - f.dim))
    ref = _reference_flavour_params(width)
    measured_bytes = _bytes_per_weight(PRESETS[preset].get("base_quantization", "none"))
    ref_weights = ref[0] * measured_bytes * 1e9 / 2**30
    activations = (MEASURED_PEAK_GIB[width][preset] - ref_weights) * (f.dim * f.num_layers) / (width * ref[1])
    bytes_per_weight = _bytes_per_weight(base_quantization or PRESETS[preset].get("base_quantization", "none"))
    weights = _params_billion(f) * bytes_per_weight * 1e9 / 2**30
    return weights + activations * tokens * batch / MEASURED_TOKENS


def _reference_flavour_params(width: int) -> tuple[float, int]:
    from trainer.flavours import FLAVOURS

    ref = next(f for f in FLAVOURS.values() if f.dim == width and f.hub_id)
    return _params_billion(ref), ref.num_layers


def flavour_tokens(f: Flavour) -> int:
    latent_frames = (f.num_frames - 1) // 4 + 1
    return latent_frames * (f.height // (f.vae_spatial * 2)) * (f.width // (f.vae_spatial * 2))


def estimated_offload_gib(f: Flavour, preset: str, tokens: int, batch: int = 1) -> float:
    """Host RAM the activation offload of `preset` holds for one step (0 for presets without offload)."""
    width = min(MEASURED_OFFLOAD_GIB, key=lambda w: abs(w - f.dim))
    layers = _reference_flavour_params(width)[1]
    scale = (f.dim * f.num_layers) / (width * layers) * tokens * batch / MEASURED_TOKENS
    return MEASURED_OFFLOAD_GIB[width][preset] * scale


def host_memory_gib() -> float:
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available / 2**30


def choose_preset(f: Flavour, gpu_gib: float, tokens: int | None = None, batch: int = 1,
                  host_gib: float | None = None, warn: bool = True, base_quantization: str | None = None) -> str:
    """The first (fastest) preset whose estimated peak fits the GPU and whose offload fits the free host RAM
    (with the user's own `base_quantization` in place of the preset's, where set)."""
    tokens = tokens or flavour_tokens(f)
    usable = [name for name in PRESETS if name not in OPT_IN and (
        host_gib is None or estimated_offload_gib(f, name, tokens, batch) <= HOST_SHARE * host_gib)]
    for name in usable:
        if estimated_peak_gib(f, name, tokens, batch, base_quantization) <= HEADROOM * gpu_gib:
            return name
    smallest = min(usable, key=lambda name: estimated_peak_gib(f, name, tokens, batch, base_quantization))
    (log.warning if warn else log.debug)("no memory preset is expected to fit %.0f GiB GPU memory (with %s host RAM) for %s; using \"%s\"",
                gpu_gib, f"{host_gib:.0f} GiB" if host_gib is not None else "unknown", f.name, smallest)
    return smallest


def resolve_memory(cfg: MemoryConfig, f: Flavour, gpu_gib: float | None, tokens: int | None = None,
                   batch: int = 1, host_gib: float | None = None, warn: bool = True) -> MemoryConfig:
    """The [memory] settings to train with: the preset's values under the fields the user set explicitly."""
    if cfg.preset == "none" or (cfg.preset == "auto" and not gpu_gib):
        return cfg
    name = cfg.preset
    if name == "auto":
        quantization = cfg.base_quantization if "base_quantization" in cfg.model_fields_set else None
        name = choose_preset(f, gpu_gib, tokens, batch, host_gib, warn, quantization)
        (log.info if warn else log.debug)("memory preset auto -> %s (%.0f GiB GPU)", name, gpu_gib)
    explicit = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "preset"}
    values = dict(PRESETS[name])
    if explicit.get("gradient_checkpointing") == "none":  # offload and sub-layers act on checkpointed blocks only
        values.pop("activation_offload", None)
        values.pop("checkpoint_sublayers", None)
    return MemoryConfig(**{**values, **explicit, "preset": cfg.preset})


def preset_of(memory: MemoryConfig) -> str | None:
    """The preset these settings are exactly (for picking measured rows), or None for a custom mix."""
    for name, values in PRESETS.items():
        if all(getattr(memory, k) == v for k, v in values.items()) and all(
                getattr(memory, k) == MemoryConfig.model_fields[k].default
                for k in {"checkpointed_blocks", "base_quantization", "feed_forward_chunk_size", "activation_offload",
                          "checkpoint_sublayers"}
                - set(values)):
            return name
    return None
