"""Sharded frozen base (`[memory] shard_base = true`): each of N training processes holds 1/N of the transformer.

torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each transformer block, then the rest of the model, over
all processes; a block's weights are all-gathered just before it runs and freed after (forward and backward). The peft
LoRA parameters live inside the blocks and are sharded with them; only they have gradients (reduce-scattered in fp32),
the frozen base gets none. accelerate 1.x only drives FSDP2 for GPU process groups, so wanforge calls `fully_shard`
itself (the same path on CPU/gloo in the tests as on NCCL GPUs) and gives accelerate the sharded model for autocast
only (`prepare_model(evaluation_mode=True)`: no DDP around it).

Everything that reads or writes full tensors goes through two functions here: `full_tensors` (all ranks call it:
the LoRA and the optimizer state gathered for checkpoints and the export) and `shard_like` (a full tensor loaded into a
sharded parameter or its optimizer state takes this rank's slice). Rank-0 validation and eval loss run the sharded
forward on every rank in step (each all-gather needs all ranks); only rank 0 keeps what they produce.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

log = logging.getLogger(__name__)

# Settings shard_base cannot train with, and the valid fix each one-line refusal names (preflight: check_shard_base).
_CONFLICTS: tuple[tuple[str, Any, str], ...] = (
    ("memory.base_quantization", lambda c: c.memory.base_quantization != "none",
     'memory.base_quantization = "none" (sharding needs bf16 base weights: int8 / fp8 weights do not shard)'),
    ("memory.compile", lambda c: "compile" in c.memory.model_fields_set and c.memory.compile,
     "memory.compile = false (regional compile is not combined with sharding)"),
    ("memory.streamed_blocks", lambda c: "streamed_blocks" in c.memory.model_fields_set and c.memory.streamed_blocks,
     "memory.streamed_blocks = 0 (every process holds its slice of every block on its GPU)"),
    ("model.train_both_experts", lambda c: c.model.train_both_experts,
     "model.train_both_experts = false (train one expert per run)"),
    ("lora.lora_type", lambda c: c.lora.lora_type != "lora", 'lora.lora_type = "lora" (peft LoRA)'),
    ("ema.use_ema", lambda c: c.ema.use_ema, "ema.use_ema = false"),
    ("crepa.enabled", lambda c: c.crepa.enabled, "crepa.enabled = false (its head trains outside the sharded model)"),
    ("tread.routes", lambda c: any(r.selection_ratio > 0 for r in c.tread.routes), "tread.routes = []"),
    ("scheduled_sampling.probability", lambda c: c.scheduled_sampling.probability > 0
     or c.scheduled_sampling.probability_start > 0,
     "scheduled_sampling.probability = 0 and probability_start = 0 (each rank rolls out its own number of samples, "
     "and every sharded forward needs all ranks)"),
)


def shard_conflicts(cfg, processes: int) -> list[str]:
    """One line per reason `cfg` cannot train with `memory.shard_base = true` on `processes` processes (torch-free)."""
    if not cfg.memory.shard_base:
        return []
    errors = []
    if processes < 2:
        errors.append("memory.shard_base = true needs 2 or more training processes (one per GPU, e.g. torchrun "
                      "--nproc_per_node=2 or resources.accelerators = \"GPU:2\"): start it on several GPUs, or set "
                      "memory.shard_base = false")
    for field, conflicts, fix in _CONFLICTS:
        if conflicts(cfg):
            errors.append(f"{field}: not supported with memory.shard_base = true: set {fix}, or set "
                          "memory.shard_base = false")
    return errors


def check_shard_base(run) -> None:
    """Preflight check (trainer/preflight/)."""
    for line in shard_conflicts(run.cfg, run.num_processes):
        run.error(line)


# ---------------------------------------------------------------- the model


def shard_transformer(transformer, device) -> None:
    """Shard every transformer block, then the rest, over all processes (in place; the model may wait on the CPU: each
    block's slice moves to `device` as it is sharded, so no process ever holds the whole base model there).

    Every parameter keeps its own dtype (bf16 base, the fp32 norms and modulation tables diffusers keeps, fp32 LoRA;
    FSDP all-gathers mixed dtypes as bytes) and autocast picks the matmul dtype, exactly as unsharded training does:
    the gradients are the LoRA's fp32 ones, reduce-scattered in fp32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # diffusers' Wan forward returns a reshaped view; the warning is about in-place ops on it, and wanforge only reads
    # the prediction out of place (trainer/loop/flow.py; tests/test_sharding.py compares the gradients with DDP's)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPWan\w*Transformer3DModel\) returned a view",
                            category=UserWarning)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in [*transformer.blocks, *(getattr(transformer, "vace_blocks", None) or [])]:  # VACE: its blocks too
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=False)  # the root's few weights stay for backward
    transformer.register_load_state_dict_pre_hook(_take_local_slices)
    log.info("sharded the transformer over %d processes (%d blocks)", dist.get_world_size(), len(transformer.blocks))


def is_sharded(model) -> bool:
    """True for a model `shard_transformer` sharded: its forward is collective (every rank must run it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def prepare_sharded(accelerator, transformer, optimizer):
    """accelerate for a sharded model: autocast around its forward (no DDP: FSDP reduces the gradients), the optimizer
    prepared as usual."""
    transformer = accelerator.prepare_model(transformer, device_placement=False, evaluation_mode=True)
    return transformer, accelerator.prepare_optimizer(optimizer, device_placement=False)


# ---------------------------------------------------------------- full tensors <-> this rank's slices


def full_tensors(obj: Any) -> Any:
    """`obj` (nested dicts / lists / tuples of tensors) with every sharded tensor gathered whole. A collective when
    anything is sharded: every rank calls it with the same structure. Plain tensors are returned as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def shard_like(value, like):
    """A full tensor as `like`'s sharded layout (this rank's slice, no communication: every rank read the same file);
    `value` unchanged where `like` is not sharded or the shapes differ (an optimizer's step count)."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or not torch.is_tensor(value) or isinstance(value, DTensor) \
            or tuple(value.shape) != tuple(like.shape):
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def _take_local_slices(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a sharded model: full tensors (checkpoints, LoRA files) become this rank's slices."""
    targets = dict(module.named_parameters())
    for key in list(state_dict):
        target = targets.get(key[len(prefix):]) if key.startswith(prefix) else None
        if target is not None:
            state_dict[key] = shard_like(state_dict[key], target)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """An optimizer state_dict of full tensors (a checkpoint) as this rank's slices of its sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {index: {k: shard_like(v, params[int(index)]) for k, v in entry.items()}
                 for index, entry in state.get("state", {}).items()}
    return {**state, "state": per_param}
