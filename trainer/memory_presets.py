"""Memory presets: named `[memory]` settings, and "auto", which picks the fastest one predicted to fit both the GPU's
memory and the free host RAM. The predictions come from trainer/sizing.py (measured rows in launcher/calibration.toml),
the same model `wanforge estimate` uses. Fields the user set in `[memory]` always win.

With several training processes on one machine (DDP), every process offloads at once and they contend for host
memory bandwidth (measured: 1.68x instead of 2x on two H100s with `balanced`), so `auto` then ranks the fitting presets
by predicted s/step with that contention added (trainer/sizing.py offload_contention) instead of the one-GPU order.
"""

from __future__ import annotations

import logging
import os

from trainer.config import MemoryConfig
from trainer.flavours import Flavour
from trainer.sizing import (fits_gpu, fits_host, flavour_shape, host_memory_gib,  # noqa: F401 (re-export)
                            local_processes, predict_memory, relative_step_seconds)

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
# what a preset's values lose under `shard_base` (trainer/sharding.py: bf16 base weights, no regional compile)
NOT_SHARDED = ("compile", "base_quantization")


def preset_values(name: str, shard_base: bool = False) -> dict:
    """The [memory] fields preset `name` sets (without those sharding cannot keep)."""
    return {k: v for k, v in PRESETS[name].items() if not (shard_base and k in NOT_SHARDED)}


def flavour_tokens(f: Flavour) -> int:
    """Tokens of the flavour's default clip."""
    return flavour_shape(f.name).tokens(f.num_frames, f.height, f.width)


def estimated_peak_gib(f: Flavour, preset: str, tokens: int, batch: int = 1,
                       base_quantization: str | None = None) -> float:
    """GPU peak of `preset` for this flavour and token count (trainer/sizing.py)."""
    return predict_memory(flavour_shape(f.name), preset, tokens, batch, base_quantization).gpu_gib


def estimated_offload_gib(f: Flavour, preset: str, tokens: int, batch: int = 1) -> float:
    """Host RAM the activation offload of `preset` holds for one step (0 for presets without offload)."""
    return predict_memory(flavour_shape(f.name), preset, tokens, batch).offload_gib


def choose_preset(f: Flavour, gpu_gib: float, tokens: int | None = None, batch: int = 1,
                  host_gib: float | None = None, warn: bool = True, base_quantization: str | None = None,
                  processes: int = 1, shards: int = 1) -> str:
    """The first (fastest) preset whose predicted GPU peak fits the GPU and whose offload fits the free host RAM
    (with the user's own `base_quantization` in place of the preset's, where set). With `processes` > 1 training
    processes on the machine: the fitting preset with the least predicted s/step including offload contention.
    `shards` > 1: the frozen base is sharded over that many processes (`shard_base`)."""
    tokens = tokens or flavour_tokens(f)
    shape = flavour_shape(f.name)
    predicted = {name: predict_memory(shape, name, tokens, batch, base_quantization, shards=shards)
                 for name in PRESETS if name not in OPT_IN
                 and not (shards > 1 and "base_quantization" in PRESETS[name])}  # sharded: bf16 weights only
    usable = [name for name, p in predicted.items() if fits_host(p.offload_gib, host_gib)]
    fitting = [name for name in usable if fits_gpu(predicted[name].gpu_gib, gpu_gib)]
    if fitting and processes > 1:
        return min(fitting, key=lambda name: relative_step_seconds(shape, name, tokens, batch, processes,
                                                                   base_quantization))
    if fitting:
        return fitting[0]
    smallest = min(usable or predicted, key=lambda name: predicted[name].gpu_gib)
    (log.warning if warn else log.debug)(
        "no memory preset is expected to fit %.0f GiB GPU memory (with %s host RAM) for %s; using \"%s\"",
        gpu_gib, f"{host_gib:.0f} GiB" if host_gib is not None else "unknown", f.name, smallest)
    return smallest


def resolve_memory(cfg: MemoryConfig, f: Flavour, gpu_gib: float | None, tokens: int | None = None,
                   batch: int = 1, host_gib: float | None = None, warn: bool = True,
                   processes: int | None = None, world_size: int | None = None) -> MemoryConfig:
    """The [memory] settings to train with: the preset's values under the fields the user set explicitly.
    `processes`: training processes on the machine (default: this process's LOCAL_WORLD_SIZE); `world_size`: of the
    whole run, what `shard_base` shards over (default: WORLD_SIZE, else `processes`)."""
    if cfg.preset == "none" or (cfg.preset == "auto" and not gpu_gib):
        return cfg
    name = cfg.preset
    if name == "auto":
        quantization = cfg.base_quantization if "base_quantization" in cfg.model_fields_set else None
        processes = local_processes() if processes is None else processes
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "0") or 0) or processes
        name = choose_preset(f, gpu_gib, tokens, batch, host_gib, warn, quantization, processes,
                             world_size if cfg.shard_base else 1)
        (log.info if warn else log.debug)("memory preset auto -> %s (%.0f GiB GPU, %d process(es) on this machine)",
                                          name, gpu_gib, processes)
    explicit = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "preset"}
    values = preset_values(name, cfg.shard_base)
    if explicit.get("gradient_checkpointing") == "none":  # offload and sub-layers act on checkpointed blocks only
        values.pop("activation_offload", None)
        values.pop("checkpoint_sublayers", None)
    return MemoryConfig(**{**values, **explicit, "preset": cfg.preset})


def memory_choice(requested: MemoryConfig, resolved: MemoryConfig, gpu_gib: float | None,
                  host_gib: float | None) -> dict[str, object]:
    """What run.json records about the memory settings that ran: which preset and why (the node may choose
    differently from the laptop's estimate: another GPU, less host RAM, more processes)."""
    ran = preset_of(resolved) or "custom"
    if requested.preset == "auto" and gpu_gib:
        why = (f"auto: the fastest preset whose measured GPU and host memory fit this machine ({gpu_gib:.0f} GiB GPU, "
               f"{host_gib or 0:.0f} GiB host RAM per process, {local_processes()} process(es))")
    elif requested.preset == "auto":
        why = "auto on a machine without a GPU: the [memory] fields as set (CPU trial)"
    elif requested.preset == "none":
        why = "preset none: the [memory] fields as set"
    else:
        why = f"memory.preset = \"{requested.preset}\" in the config"
    explicit = sorted(k for k in requested.model_fields_set if k != "preset")
    if explicit and requested.preset != "none":
        why += f"; set explicitly over the preset: {', '.join(explicit)}"
    return {"requested": requested.preset, "ran": ran, "why": why}


def preset_of(memory: MemoryConfig) -> str | None:
    """The preset these settings are exactly (for picking measured rows), or None for a custom mix."""
    for name in PRESETS:
        values = preset_values(name, memory.shard_base)
        if all(getattr(memory, k) == v for k, v in values.items()) and all(
                getattr(memory, k) == MemoryConfig.model_fields[k].default
                for k in {"checkpointed_blocks", "base_quantization", "feed_forward_chunk_size", "activation_offload",
                          "checkpoint_sublayers"}
                - set(values)):
            return name
    return None
