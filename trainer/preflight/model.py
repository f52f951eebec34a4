"""Preflight checks of the names a config gives the model: LoRA target modules, block indices (skip layers, TREAD,
CREPA, streamed blocks), attention backends, expert options, and whether the adapter can be saved in the interchange
format."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.model.wan_layout import ADAPTABLE, module_layout, resolve_routes, rotary_positions

if TYPE_CHECKING:
    from trainer.preflight.report import PreflightRun

def check_target_modules(run: PreflightRun) -> None:
    """Every target names a module peft would find (a full path such as "blocks.3.attn1.to_q", or its dotted suffix),
    and only layers a LoRA can adapt. One index of every module's suffixes: linear in the list, however long."""
    lora = run.cfg.lora
    layout = module_layout(run.flavour, run.blocks)
    index: dict[str, list[str]] = {}
    for path in layout:
        parts = path.split(".")
        for i in range(len(parts)):
            index.setdefault(".".join(parts[i:]), []).append(path)
    linears = sorted({s for s, paths in index.items() if not s.isdigit() and not s.startswith("blocks.")
                      and any(layout[p] in ADAPTABLE for p in paths)})
    for target in lora.target_modules:
        found = {p: layout[p] for p in index.get(target, [])}
        if not found:
            close = difflib.get_close_matches(target, linears, n=1)
            fix = f'did you mean "{close[0]}"?' if close else 'names are diffusers ones, e.g. "attn1.to_q", "ffn.net.0.proj"'
            run.error(f'lora.target_modules: "{target}" matches no module of the {run.flavour.name} transformer: {fix}')
            continue
        other = sorted({k for k in found.values() if k not in ADAPTABLE})
        if other:
            first = next(p for p, k in found.items() if k not in ADAPTABLE)
            inside = sorted(re.sub(r"^blocks\.\d+\.", "", p) for p in index
                            if p.startswith(first + ".") and p in layout and layout[p] in ADAPTABLE)
            fix = f'name its linear layers instead, e.g. "{inside[0]}"' if inside else "remove it"
            run.error(f'lora.target_modules: "{target}" selects {", ".join(other)} modules, which take no LoRA '
                      f"(only linear and conv layers do): {fix}")


def check_rotary_positions(run: PreflightRun) -> None:
    """Every training and validation size within the positions the transformer's rotary embedding has (beyond them
    the model fails at its first step with a shape error)."""
    from trainer.data.buckets import frame_size, size_in_units

    f = run.flavour
    most = rotary_positions(run.cfg.model, f)
    px = f.vae_spatial * 2  # pixels per patch
    longest_side, longest_frames = most * px // 16 * 16, (most - 1) * 4 + 1
    sizes = []
    for i, ds in enumerate(run.cfg.datasets):
        width, height = frame_size(ds, f, f.width, f.height)
        sizes.append((f"datasets[{i}]", width, height, run.cfg.dataset_shape(i)[0], ds.width is not None))
    v = run.cfg.validation
    frames, height, width = run.cfg.dataset_shape(0) if run.cfg.datasets else (f.num_frames, f.height, f.width)
    if v.width is not None or v.num_frames is not None:  # else it renders dataset 0's size, checked above
        sizes.append(("validation", v.width or width, v.height or height, v.num_frames or frames, True))
    for where, width, height, frames, fixed in sizes:
        if max(width, height) > longest_side:
            scale = longest_side / max(width, height)
            if fixed or where == "validation":
                w, h = (max(16, int(x * scale) // px * px) for x in (width, height))
                fix = f"{where}.width = {w} and {where}.height = {h}"
            else:
                ds = run.cfg.datasets[int(where[9:-1])]
                target = ds.resolution if ds.resolution is not None else size_in_units(f.width, f.height,
                                                                                       ds.resolution_type)
                lower = target * (scale if ds.resolution_type != "area" else scale * scale)
                fix = f"{where}.resolution = {lower:.2f}".rstrip("0").rstrip(".") if ds.resolution_type == "area" \
                    else f"{where}.resolution = {int(lower) // px * px}"
            run.error(f"{where}: {width}x{height} needs {max(width, height) // px} positions per side, more than the "
                      f"{most} the {f.name} transformer has (rope_max_seq_len): try {fix}")
        if frames > longest_frames:
            run.error(f"{where}: {frames} frames need {(frames - 1) // 4 + 1} positions in time, more than the {most} the "
                      f"{f.name} transformer has (rope_max_seq_len): try {where}.num_frames = {longest_frames}")


def check_block_indices(run: PreflightRun) -> None:
    cfg, blocks = run.cfg, run.blocks
    bad = [i for i in cfg.validation.skip_layers if i >= blocks]
    if bad:
        run.error(f"validation.skip_layers: {bad} out of range, {run.flavour.name} has blocks 0..{blocks - 1}: "
                  f"try [{min(9, blocks - 1)}]")
    if cfg.tread.routes:
        resolve_routes(cfg.tread, blocks)
    if cfg.crepa.enabled and cfg.crepa.block_index >= blocks:
        run.error(f"crepa.block_index = {cfg.crepa.block_index}: {run.flavour.name} has blocks 0..{blocks - 1}: "
                  f"try {min(8, blocks - 1)}")


def effective_memory(run: PreflightRun):
    """The [memory] settings a run gets where the config decides them: a named preset's values under the fields set
    explicitly ("auto" is chosen on the node: its explicit fields only)."""
    from trainer.model.preset_choice import resolve_memory

    return resolve_memory(run.cfg.memory, run.flavour, None, warn=False)


def check_streaming(run: PreflightRun) -> None:
    """Weight streaming (memory.streamed_blocks, preset low-16gb): a count the model has, checkpointed blocks, bf16
    or int8 weights, one expert per run."""
    memory, explicit = run.cfg.memory, run.cfg.memory.model_fields_set
    if "streamed_blocks" in explicit and memory.streamed_blocks:
        if memory.streamed_blocks > run.blocks:
            run.error(f"memory.streamed_blocks = {memory.streamed_blocks}: {run.flavour.name} has {run.blocks} "
                      f"transformer blocks: try {run.blocks} (every block) or fewer")
        elif memory.checkpointed_blocks is not None and memory.streamed_blocks > memory.checkpointed_blocks:
            run.error(f"memory.streamed_blocks = {memory.streamed_blocks} is more than memory.checkpointed_blocks = "
                      f"{memory.checkpointed_blocks} (only checkpointed blocks stream): set memory.streamed_blocks = "
                      f"{memory.checkpointed_blocks}, or memory.checkpointed_blocks = none")
    try:
        resolved = effective_memory(run)
    except ValueError as err:  # the schema's own refusals of the mix (a named preset under explicit fields)
        run.error(f"memory: {err}")
        return
    if not resolved.streamed_blocks or resolved.gradient_checkpointing == "none":
        return
    where = ("memory.streamed_blocks" if "streamed_blocks" in explicit
             else f'memory.preset = "{memory.preset}" (it streams the weights of {resolved.streamed_blocks} blocks)')
    if resolved.base_quantization == "fp8":
        run.error(f'{where}: fp8 base weights do not stream: set memory.base_quantization = "int8", or '
                  "memory.streamed_blocks = 0")
    if run.cfg.model.train_both_experts:
        run.error(f"{where}: not with model.train_both_experts (each expert would stream its own blocks): set "
                  "memory.streamed_blocks = 0, or train one expert per run")


@functools.lru_cache(maxsize=1)
def _attention_dispatch_tree() -> ast.Module | None:
    """diffusers' models/attention_dispatch.py, parsed without importing it (None: diffusers is absent); parsed once
    per process (a check of a thousand-dataset config, or the form's every change, asks for it again)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0]) / "models" / "attention_dispatch.py"
    try:
        return ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None


def _backend_members(tree: ast.Module) -> dict[str, str]:
    """AttentionBackendName member -> backend name."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "AttentionBackendName":
            return {s.targets[0].id: s.value.value for s in node.body
                    if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name)
                    and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)}
    return {}


def attention_backend_names() -> list[str] | None:
    """diffusers' attention backend names, read from its source without importing it (None: diffusers is absent)."""
    tree = _attention_dispatch_tree()
    return None if tree is None else list(_backend_members(tree).values()) or None


def context_parallel_backend_names() -> list[str] | None:
    """The backends diffusers registers with `supports_context_parallel=True` (what `enable_parallelism` accepts),
    read from its source (None: diffusers is absent)."""
    tree = _attention_dispatch_tree()
    if tree is None:
        return None
    members, found = _backend_members(tree), []
    for node in tree.body:
        for decorator in getattr(node, "decorator_list", []):
            if not (isinstance(decorator, ast.Call) and decorator.args
                    and isinstance(decorator.args[0], ast.Attribute) and decorator.args[0].attr in members):
                continue
            if any(k.arg == "supports_context_parallel" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in decorator.keywords):
                found.append(members[decorator.args[0].attr])
    return found


def check_attention_backend(run: PreflightRun) -> None:
    name = run.cfg.memory.attention_backend
    names = attention_backend_names()
    if name == "auto" or names is None or name in names:
        _context_parallel_backend(run)
        return
    close = difflib.get_close_matches(name, names, n=1)
    fix = f'did you mean "{close[0]}"?' if close else 'use "auto" or one of: ' + ", ".join(names)
    run.error(f'memory.attention_backend: unknown backend "{name}": {fix}')


def _context_parallel_backend(run: PreflightRun) -> None:
    """Under context parallel every attention runs through diffusers' Ulysses path, which only some backends have."""
    memory = run.cfg.memory
    supported = context_parallel_backend_names()
    if memory.context_parallel <= 1 or memory.attention_backend == "auto" or supported is None \
            or memory.attention_backend in supported:
        return
    run.error(f'memory.attention_backend = "{memory.attention_backend}" has no context-parallel path in diffusers '
              f'(memory.context_parallel = {memory.context_parallel}): use "auto" (cuDNN SDPA on NVIDIA) or one of: '
              + ", ".join(sorted(supported)))


def check_experts(run: PreflightRun) -> None:
    m, steps = run.cfg.model, run.cfg.train.max_train_steps
    if m.train_both_experts and m.expert_switch_every_n_steps >= steps:
        run.warn(f"model.expert_switch_every_n_steps = {m.expert_switch_every_n_steps} is not below "
                 f"train.max_train_steps = {steps}: the other expert never trains (its LoRA is saved untrained)")
    if m.train_both_experts and run.num_processes > 1:
        run.error(f"model.train_both_experts runs on one GPU, not {run.num_processes}: train each expert as its own "
                  "multi-GPU run, or use one GPU")


def check_adapter_saveable(run: PreflightRun) -> None:
    """Can the adapter be written as a LoRA file native ComfyUI and diffusers both load (trainer.model.lora_names, no torch)?
    Targets that match nothing are reported once, by the target check above, with its did-you-mean."""
    from trainer.model.lora_names import interchange_problems

    for line in interchange_problems(run.cfg):
        if "matches no module" not in line:
            run.error(line)
