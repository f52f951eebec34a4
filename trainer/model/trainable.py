"""The trainable Wan transformer, assembled in one order everywhere (the loop, the Wan 2.2 experts, the benches):
load -> quantize and place the frozen base -> add the adapter -> memory options (attention, checkpointing, offload,
compile) -> split the sequence (`[memory] context_parallel`) or shard over the processes (`[memory] shard_base`). The
order matters: quantization before the adapter, the adapter before checkpointing wraps the blocks, context parallel
after the block classes and the attention backend are set (its hooks wrap them), sharding last (FSDP then manages the
LoRA weights inside each block)."""

from __future__ import annotations

import torch

from trainer.config.model import LoraConfig, MemoryConfig
from trainer.config.schema import WanforgeConfig
from trainer.model.components import load_transformer
from trainer.model.lora import add_lora
from trainer.model.memory import apply_memory_options, place_base_model
from trainer.model.offload import ActivationOffloader


def make_trainable(transformer, lora: LoraConfig, memory: MemoryConfig, device: torch.device,
                   base_device: torch.device | None = None) -> ActivationOffloader | None:
    """Turn a loaded (or, in the benches, freshly built) transformer into the one that trains. `base_device`: where the
    frozen base waits (the idle Wan 2.2 expert waits in CPU RAM); default `device`. Returns the activation offloader,
    if any (its byte count is a metric)."""
    place_base_model(transformer, memory, torch.device("cpu") if memory.shard_base else base_device or device)
    add_lora(transformer, lora)
    offloader = apply_memory_options(transformer, memory, device)
    if memory.context_parallel > 1:  # trainer/model/context_parallel.py: after the block classes and attention backend
        from trainer.model.context_parallel import enable_context_parallel

        enable_context_parallel(transformer, memory.context_parallel, device)
    if memory.shard_base:  # trainer/model/sharding.py: each process keeps 1/N of the weights on `device`
        from trainer.model.sharding import shard_transformer

        shard_transformer(transformer, device)
        if offloader is not None:  # its host budget was taken while the whole base still sat in this process's RAM
            import gc

            from trainer.model.memory import offload_host_budget

            gc.collect()
            offloader.set_host_budget(offload_host_budget())
    return offloader


def build_trainable_transformer(cfg: WanforgeConfig, dtype: torch.dtype, device: torch.device, *,
                                subfolder: str | None = None, base_device: torch.device | None = None):
    """Load the config's transformer (or one expert's `subfolder`) and make it trainable (`make_trainable`)."""
    transformer = load_transformer(cfg.model, dtype, subfolder=subfolder)
    make_trainable(transformer, cfg.lora, cfg.memory, device, base_device)
    return transformer
