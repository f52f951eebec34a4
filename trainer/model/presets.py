"""The memory presets: named `[memory]` settings (the table `auto`, the estimate and the form read), and which
preset a set of `[memory]` values is."""

from __future__ import annotations

from trainer.config.model import MemoryConfig

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
    # Wan 14B at 832x480x81 on a 16 GB card (issue 31): 30 of the 40 blocks stream their int8 weights from host RAM
    # (trainer/model/streaming.py); full checkpointing so the offload keeps one hidden-size tensor per block instead
    # of selective's two (host RAM: offload + streamed weights stay under 32 GiB)
    "low-16gb": {"gradient_checkpointing": "full", "compile": True, "activation_offload": True,
                 "feed_forward_chunk_size": 4096, "base_quantization": "int8", "streamed_blocks": 30},
    # balanced with fp8 base weights and fp8 matmuls: the fastest measured step, but fp8 changes the numbers (~3%
    # relative error per matmul), so it is opt-in: `auto` never picks it
    "balanced-fp8": {"gradient_checkpointing": "selective", "compile": True, "activation_offload": True,
                     "checkpoint_sublayers": True, "base_quantization": "fp8"},
}
OPT_IN = {"balanced-fp8"}
# presets without measured rows of their own yet: the measured presets whose rows size them (memory: GPU and host,
# speed: s/step), adjusted for what differs (trainer/model/sizing.py); every such figure is labelled extrapolated
SIZED_FROM: dict[str, dict[str, str]] = {"low-16gb": {"memory": "low-int8", "speed": "low-host-ram"}}
# what a preset's values lose under `shard_base` (trainer/model/sharding.py: bf16 base weights, no regional compile,
# every block's weights on the GPU)
NOT_SHARDED = ("compile", "base_quantization", "streamed_blocks")


def streams(name: str) -> bool:
    """Preset `name` streams block weights from host RAM (`streamed_blocks`)."""
    return bool(PRESETS[name].get("streamed_blocks"))


def preset_values(name: str, shard_base: bool = False) -> dict:
    """The [memory] fields preset `name` sets (without those sharding cannot keep)."""
    return {k: v for k, v in PRESETS[name].items() if not (shard_base and k in NOT_SHARDED)}


def preset_of(memory: MemoryConfig) -> str | None:
    """The preset these settings are exactly (for picking measured rows), or None for a custom mix."""
    for name in PRESETS:
        values = preset_values(name, memory.shard_base)
        if all(getattr(memory, k) == v for k, v in values.items()) and all(
                getattr(memory, k) == MemoryConfig.model_fields[k].default
                for k in {"checkpointed_blocks", "base_quantization", "feed_forward_chunk_size", "activation_offload",
                          "checkpoint_sublayers", "streamed_blocks"}
                - set(values)):
            return name
    return None
