"""Preflight of `[[validation.renders]]`: their extra LoRA files (each one's keys read from its header and run through
diffusers' Wan converter on shape-only tensors: which keys would not apply to this model and why), the experts they
name, and the settings a render combines. Torch-free at import; the key analysis imports torch inside (`check` runs it,
the notebook form's torch-free pass does not)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config.outputs import HUB_PREFIX, HubFile
from trainer.model.adapter_keys import AdapterFileError, TensorInfo, analyse_header, parse_header, read_alphas, read_header
from trainer.model.wan_layout import linear_shapes, transformer_dims

if TYPE_CHECKING:
    from trainer.preflight.report import PreflightRun


def _adapters(run: PreflightRun):
    for i, render in enumerate(run.cfg.validation.renders):
        for j, adapter in enumerate(render.adapters):
            yield f"validation.renders[{i}].adapters[{j}]", render, adapter


def _expert_slots(run: PreflightRun) -> set[str]:
    """The experts a validation render has on this run (trainer.outputs.pipelines.expert_slots)."""
    f, m = run.flavour, run.cfg.model
    if not f.is_expert:
        return {"all"}
    if m.wan_validation_load_other_stage or m.train_both_experts:
        return {"high", "low"}
    return {f.stage}


def check_validation_renders(run: PreflightRun) -> None:
    """Torch-free: experts, skip layers, strengths the run's adapter type can take, and whether each file is there."""
    cfg, f = run.cfg, run.flavour
    slots = _expert_slots(run)
    for i, render in enumerate(cfg.validation.renders):
        where = f"validation.renders[{i}] ({render.name})"
        bad = [b for b in render.skip_layers or [] if b >= run.blocks]
        if bad:
            run.error(f"{where}.skip_layers: {bad} out of range, {f.name} has blocks 0..{run.blocks - 1}: "
                      f"try [{min(9, run.blocks - 1)}] or [] (off)")
        if render.lora_strength != 1.0 and cfg.lora.lora_type == "lycoris":
            run.error(f"{where}.lora_strength = {render.lora_strength:g}: a LyCORIS adapter renders at the strength it "
                      'was trained with: use 1.0 (or its "multiplier" in lora.lycoris_config)')
        low = render.guidance_scale_low
        if f.is_expert and render.guidance_scale is not None and render.guidance_scale <= 1.0 and low is not None \
                and low > 1.0:
            run.warn(f"{where}: guidance_scale = {render.guidance_scale:g} turns classifier-free guidance off for the "
                     f"whole render in diffusers' Wan pipeline, so guidance_scale_low = {low:g} is not used")
        if render.adapters and cfg.memory.shard_base:
            run.error(f"{where}.adapters: stacking adapters needs the whole transformer on one GPU, and "
                      "memory.shard_base splits it: render them after training with `wanforge validate CONFIG --lora "
                      "LORA`, or remove them")
    for where, render, adapter in _adapters(run):
        if adapter.expert != "both" and "all" in slots:
            run.error(f'{where}.expert = "{adapter.expert}": only Wan 2.2 A14B has experts, {f.name} has one '
                      'transformer: use expert = "both"')
        elif adapter.expert != "both" and adapter.expert not in slots:
            run.warn(f'{where}.expert = "{adapter.expert}": validation renders with the {f.stage}-noise expert alone, '
                     "so this adapter is not used: set model.wan_validation_load_other_stage = true to render with both")
        if adapter.hub_file is None:
            path = Path(adapter.path)
            if not path.is_file():
                run.error(f"{where}.path: {path} is not a file: give a .safetensors LoRA file or "
                          f"{HUB_PREFIX}owner/repo/file.safetensors")
            else:
                try:
                    _local_header(str(path), path.stat().st_mtime)
                except AdapterFileError as err:
                    run.error(f"{where}.path: {path} {err}: give a LoRA .safetensors file")


@lru_cache(maxsize=32)
def _local_header(path: str, mtime: float) -> dict[str, TensorInfo]:
    return read_header(Path(path))


def _hub_header(run: PreflightRun, where: str, hub: HubFile) -> tuple[dict[str, TensorInfo], dict[str, float]] | None:
    """A Hub adapter's header: from the local Hub cache when it was downloaded, else read remotely (a few KB, not the
    weights). None when it cannot be read here (offline, the Hub unreachable): said as a warning."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cached = try_to_load_from_cache(hub.repo_id, hub.filename, revision=hub.revision)
    if isinstance(cached, str):
        header = _local_header(cached, os.stat(cached).st_mtime)
        return header, read_alphas(Path(cached), header)
    if constants.HF_HUB_OFFLINE or not run.here:
        run.warn(f"{where}.path: {hub} is not in the Hub cache and the Hub is not asked from here: its keys are "
                 "checked when validation downloads it")
        return None
    try:
        meta = HfApi(endpoint=constants.ENDPOINT).parse_safetensors_file_metadata(hub.repo_id, hub.filename,
                                                                                  revision=hub.revision)
    except GatedRepoError:
        run.error(f"{where}.path: {hub}: the repo is gated: accept its terms on the Hub and set HF_TOKEN")
        return None
    except RepositoryNotFoundError:
        run.error(f"{where}.path: {hub}: no repo {hub.repo_id} on the Hub (or it is private: set HF_TOKEN)")
        return None
    except RevisionNotFoundError:
        run.error(f"{where}.path: {hub}: the repo has no revision {hub.revision!r}")
        return None
    except (EntryNotFoundError, RemoteEntryNotFoundError):
        run.error(f"{where}.path: {hub}: {hub.repo_id} has no file {hub.filename}")
        return None
    except Exception as err:  # noqa: BLE001 - the Hub unreachable, a proxy, a parse failure: not checked, not fatal
        run.warn(f"{where}.path: {hub}: its header could not be read ({str(err).splitlines()[0][:160]}): not checked")
        return None
    header = parse_header({name: {"dtype": t.dtype, "shape": t.shape} for name, t in meta.tensors.items()})
    return header, {n: 1.0 for n in header if n.endswith(".alpha")}  # the names, not the scale, decide what applies


def check_validation_adapter_keys(run: PreflightRun) -> None:
    """Each adapter's keys against this model's layers (torch + diffusers inside): an error when loading would fail or
    change nothing, a warning naming the keys that would not apply and why."""
    adapters = list(_adapters(run))
    if not adapters:
        return
    shapes = linear_shapes(transformer_dims(run.cfg.model, run.flavour))
    for where, _, adapter in adapters:
        if adapter.hub_file is not None:
            found = _hub_header(run, where, adapter.hub_file)
            if found is None:
                continue
            header, alphas = found
        else:
            path = Path(adapter.path)
            if not path.is_file():
                continue  # check_validation_renders said so
            try:
                header = _local_header(str(path), path.stat().st_mtime)
                alphas = read_alphas(path, header)
            except (AdapterFileError, OSError, ValueError):
                continue  # said by check_validation_renders
        report = analyse_header(header, alphas, shapes)
        for line in report.errors:
            run.error(f"{where}.path: {adapter.path} {line}" if line.startswith(("is ", "has ")) else
                      f"{where}.path: {adapter.path}: {line}: use a LoRA made for {run.flavour.name}'s model")
        for line in report.not_applied:
            run.warn(f"{where}.path: {adapter.path}: keys that would not apply: {line}")
