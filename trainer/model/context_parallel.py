"""Context parallel (`[memory] context_parallel = N`): each sample's video tokens are split over N processes, through
diffusers' own context parallelism (`ContextParallelConfig(ulysses_degree=N)` and the `_cp_plan` of
WanTransformer3DModel): the sequence is split at the first block, every attention all-to-alls its heads (Ulysses),
and the prediction is gathered whole at `proj_out`. Activations per GPU shrink about N times: 720p and long clips.

How the run stays exactly the one-process run (tests/test_context_parallel.py):
- the N processes of a context-parallel group train on the SAME micro-batch with the same noise, timesteps and
  caption dropout: the data and noise streams are split over the data-parallel ranks only (`data_parallel`);
- each rank's LoRA gradient holds its own tokens' share; the group's sum is the whole gradient. DDP averages over all
  processes, so the backward loss is scaled by N (`backward_scale`); the logged loss is not.
Ring attention is not used: Ulysses is exact with every backend that has a backward; ring needs the log-sum-exp.

Torch-free at import (the preflight imports the refusals below).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

from trainer.model.wan_layout import head_count

log = logging.getLogger(__name__)

# Settings context parallel cannot train with, and the valid fix each one-line refusal names.
_CONFLICTS: tuple[tuple[str, Any, str], ...] = (
    ("memory.shard_base", lambda c: c.memory.shard_base,
     "memory.shard_base = false (FSDP over all processes is not combined with the context-parallel groups)"),
    ("tread.routes", lambda c: any(r.selection_ratio > 0 for r in c.tread.routes),
     "tread.routes = [] (TREAD picks tokens of the whole clip; each rank holds a slice of them)"),
    ("crepa.enabled", lambda c: c.crepa.enabled,
     "crepa.enabled = false (CREPA aligns one block's hidden states of the whole clip; each rank holds a slice)"),
    ("model.train_both_experts", lambda c: c.model.train_both_experts,
     "model.train_both_experts = false (train one expert per run)"),
)


def data_parallel(rank: int, world_size: int, degree: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of process `rank`: ranks k*N .. k*N+N-1 form context-parallel group k
    and share its micro-batches (the mesh `enable_context_parallel` builds has the same layout)."""
    if degree < 1 or world_size % degree:
        raise ValueError(f"context parallel degree {degree} does not divide {world_size} processes")
    return rank // degree, world_size // degree


def backward_scale(degree: int) -> float:
    """Factor on the loss that backward sees: DDP averages the gradients of all N x D processes, and the whole gradient of
    a sample is the SUM of its N context-parallel ranks' shares."""
    return float(degree)


def context_parallel_problems(cfg, processes: int, *, heads: int | None = None) -> list[str]:
    """One line per reason `cfg` cannot train with `memory.context_parallel` on `processes` processes (torch-free).
    `heads`: the transformer's attention heads (default: read from its config, else the flavour's)."""
    degree = cfg.memory.context_parallel
    if degree <= 1:
        return []
    if heads is None:
        from trainer.flavours import get_flavour

        heads = head_count(cfg.model, get_flavour(cfg.model.flavour))
    valid = [d for d in range(1, processes + 1) if processes % d == 0 and heads % d == 0]  # 1 is always there
    fix = f"set memory.context_parallel to one of {valid} (1 turns it off)"
    errors = []
    if processes % degree:
        errors.append(f"memory.context_parallel = {degree} does not divide the {processes} training process(es) "
                      f"(groups of {degree} processes share a sample): {fix}, or start a multiple of {degree} "
                      "processes (GPUs)")
    if heads % degree:
        errors.append(f"memory.context_parallel = {degree} does not divide the model's {heads} attention heads "
                      f"(Ulysses gives each rank {heads} / {degree} of them): {fix}")
    for field, conflicts, remedy in _CONFLICTS:
        if conflicts(cfg):
            errors.append(f"{field}: not supported with memory.context_parallel = {degree}: set {remedy}, or set "
                          "memory.context_parallel = 1")
    return errors


def check_context_parallel(run) -> None:
    """Preflight check (trainer/preflight/): the settings, the process count, the validation shape; the dataset scan
    checks each bucket's shape (`bucket_problems`)."""
    for line in context_parallel_problems(run.cfg, run.num_processes):
        run.error(line)
    line = validation_problem(run.cfg)
    if line:
        run.error(line)


def data_parallel_size(cfg, processes: int) -> int:
    """Processes that take their own micro-batches: all of them, or one per context-parallel group."""
    degree = cfg.memory.context_parallel
    return processes // degree if degree > 1 and processes % degree == 0 else processes


def _token_problem(where: str, shape: tuple[int, int, int], cfg, frames_field: str) -> str | None:
    """A (frames, height, width) shape whose tokens (latent frames x patches) do not split evenly over the ranks of a
    group, with a frame count that would (`frames_field` names the field to change)."""
    from trainer.model.sizing import flavour_shape

    degree = cfg.memory.context_parallel
    frames, height, width = shape
    tokens = flavour_shape(cfg.model.flavour).tokens(frames, height, width)
    if degree <= 1 or tokens % degree == 0:
        return None
    latent_frames = (frames - 1) // 4 + 1
    per_frame = tokens // latent_frames
    ok = next(f for f in range(latent_frames + 1, latent_frames + degree + 1) if f * per_frame % degree == 0)
    return (f"{where}: {width}x{height}x{frames} is {tokens} tokens ({latent_frames} latent frames x {per_frame} "
            f"patches), which do not split evenly over memory.context_parallel = {degree} ranks: set {frames_field} = "
            f"{(ok - 1) * 4 + 1} ({ok} latent frames), or memory.context_parallel = 1")


def bucket_problems(cfg, bucket_keys: dict[int, list[str]]) -> list[str]:
    """One line per dataset bucket ("WxH@F") whose token count the context-parallel ranks cannot split evenly."""
    if cfg.memory.context_parallel <= 1:
        return []
    out = []
    for d, keys in bucket_keys.items():
        for key in sorted(set(keys)):
            size, frames = key.split("@")
            width, height = size.split("x")
            line = _token_problem(f"datasets[{d}] ({cfg.datasets[d].name}) bucket {key}",
                                  (int(frames), int(height), int(width)), cfg, f"datasets[{d}].num_frames")
            if line:
                out.append(line)
    return out


def validation_problem(cfg) -> str | None:
    """The validation render's shape (validation.* over datasets[0]'s) under context parallel, where it renders."""
    v = cfg.validation
    renders = v.at_end or 0 < v.every_n_steps < cfg.train.max_train_steps  # trainer.loop.periodic.Schedule
    if cfg.memory.context_parallel <= 1 or not renders:
        return None
    frames, height, width = cfg.dataset_shape(0)
    shape = (v.num_frames or frames, v.height or height, v.width or width)
    return _token_problem("validation", shape, cfg, "validation.num_frames")


# ---------------------------------------------------------------- the model


def is_context_parallel(model) -> bool:
    """True for a model `enable_context_parallel` split: its forward is collective (every rank of its group runs it)."""
    return getattr(model, "_parallel_config", None) is not None


def enable_context_parallel(transformer, degree: int, device) -> None:
    """Split the transformer's sequence over groups of `degree` consecutive ranks (Ulysses), through diffusers'
    `enable_parallelism`. Call after the memory options (block classes, attention backend) and before accelerate wraps
    the model; every rank calls it (it builds process groups)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    dp_rank, dp_size = data_parallel(dist.get_rank(), world, degree)
    mesh = init_device_mesh(device.type, (dp_size, 1, degree), mesh_dim_names=("dp", "ring", "ulysses"))
    with parallel_config_on_cpu():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh))
    log.info("context parallel: %d ranks per sample (Ulysses), %d data-parallel group(s); this rank is in group %d",
             degree, dp_size, dp_rank)


@contextmanager
def parallel_config_on_cpu():
    """diffusers 0.42 `ModelMixin._resolve_parallel_config` computes `rank % torch.accelerator.device_count()` for a
    device index it only records; on a machine without an accelerator that count is 0 (ZeroDivisionError). On CPU the
    count reads 1 for that call; with an accelerator nothing changes."""
    import torch

    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
