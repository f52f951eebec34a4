"""Which memory preset a run trains with: the named one, or "auto", which picks the fastest one predicted to fit both the GPU's
memory and the free host RAM. The predictions come from trainer/model/sizing.py (measured rows in launcher/calibration.toml),
the same model `wanforge estimate` uses. Fields the user set in `[memory]` always win.

With several training processes on one machine (DDP), every process offloads at once and they contend for host
memory bandwidth (measured: 1.68x instead of 2x on two H100s with `balanced`), so `auto` then ranks the fitting presets
by predicted s/step with that contention added (trainer/model/sizing.py offload_contention) instead of the one-GPU order.
"""

from __future__ import annotations

import logging
import os

from trainer.config.model import MemoryConfig
from trainer.flavours import Flavour
from trainer.model.presets import OPT_IN, PRESETS, preset_of, preset_values, streams
from trainer.model.sizing import (fits_gpu, fits_host, flavour_shape, local_processes, predict_memory,
                                  relative_step_seconds)

log = logging.getLogger(__name__)

def flavour_tokens(f: Flavour) -> int:
    """Tokens of the flavour's default clip."""
    return flavour_shape(f.name).tokens(f.num_frames, f.height, f.width)


def estimated_peak_gib(f: Flavour, preset: str, tokens: int, batch: int = 1,
                       base_quantization: str | None = None) -> float:
    """GPU peak of `preset` for this flavour and token count (trainer/model/sizing.py)."""
    return predict_memory(flavour_shape(f.name), preset, tokens, batch, base_quantization).gpu_gib


def estimated_offload_gib(f: Flavour, preset: str, tokens: int, batch: int = 1) -> float:
    """Host RAM the activation offload of `preset` holds for one step (0 for presets without offload)."""
    return predict_memory(flavour_shape(f.name), preset, tokens, batch).offload_gib


def choose_preset(f: Flavour, gpu_gib: float, tokens: int | None = None, batch: int = 1,
                  host_gib: float | None = None, warn: bool = True, base_quantization: str | None = None,
                  processes: int = 1, shards: int = 1, streaming: bool = True) -> str:
    """The first (fastest) preset whose predicted GPU peak fits the GPU and whose pinned host memory (offload and
    streamed weights) fits the free host RAM (with the user's own `base_quantization` in place of the preset's, where
    set). With `processes` > 1 training processes on the machine: the fitting preset with the least predicted s/step
    including offload contention. `shards` > 1: the frozen base is sharded over that many processes (`shard_base`).
    `streaming` False: no preset that streams weights from host RAM (a Wan 2.2 pair trained in one run)."""
    tokens = tokens or flavour_tokens(f)
    shape = flavour_shape(f.name)
    predicted = {name: predict_memory(shape, name, tokens, batch, base_quantization, shards=shards)
                 for name in PRESETS if name not in OPT_IN
                 and not (shards > 1 and "base_quantization" in PRESETS[name])  # sharded: bf16 weights only
                 and not (streams(name) and (not streaming or base_quantization == "fp8"))}
    usable = [name for name, p in predicted.items() if fits_host(p.pinned_gib, host_gib)]
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
                   processes: int | None = None, world_size: int | None = None,
                   both_experts: bool = False) -> MemoryConfig:
    """The [memory] settings to train with: the preset's values under the fields the user set explicitly.
    `processes`: training processes on the machine (default: this process's LOCAL_WORLD_SIZE); `world_size`: of the
    whole run, what `shard_base` shards over (default: WORLD_SIZE, else `processes`); `both_experts`: the run trains a
    Wan 2.2 pair (model.train_both_experts), which `auto` gives no weight-streaming preset."""
    if cfg.preset == "none" or (cfg.preset == "auto" and not gpu_gib):
        return cfg
    name = cfg.preset
    if name == "auto":
        quantization = cfg.base_quantization if "base_quantization" in cfg.model_fields_set else None
        processes = local_processes() if processes is None else processes
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "0") or 0) or processes
        name = choose_preset(f, gpu_gib, tokens, batch, host_gib, warn, quantization, processes,
                             world_size if cfg.shard_base else 1, streaming=not both_experts)
        (log.info if warn else log.debug)("memory preset auto -> %s (%.0f GiB GPU, %d process(es) on this machine)",
                                          name, gpu_gib, processes)
    explicit = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "preset"}
    values = preset_values(name, cfg.shard_base)
    if explicit.get("gradient_checkpointing") == "none":  # offload, sub-layers, streaming: checkpointed blocks only
        values.pop("activation_offload", None)
        values.pop("checkpoint_sublayers", None)
        values.pop("streamed_blocks", None)
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
