"""Extra LoRAs stacked on the run's own for one validation render (`[[validation.renders]]` adapters, e.g. a speed LoRA).

Each adapter is a local file or a Hub file (downloaded once into huggingface_hub's cache), converted by diffusers' Wan
converter (trainer.model.adapter_keys), loaded with diffusers' own `load_lora_weights` into the expert(s) it applies to
(`load_into_transformer_2` for Wan 2.2's low-noise expert), and composed with the run's LoRA by `set_adapters` at its
strength, the run's LoRA at the render's `lora_strength`. Keys that would not apply (layers the model lacks) are logged
by name and left out; a key the loader then fails to place is a bug. `stacked_adapters` takes them off after the render
and leaves each transformer as it was (its modules, active adapters, scales and requires_grad): during training it is the
live model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from trainer.config.outputs import HUB_PREFIX, parse_hub_file
from trainer.errors import UserError
from trainer.model.adapter_keys import AdapterFileError, AdapterReport, analyse, convert_lora

log = logging.getLogger(__name__)
_PEFT_INTERNAL = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|base_layer)(\.|$)")
_REPORTED: set[tuple[str, str]] = set()  # (file, expert slot) whose unapplied keys were logged in this process


def adapter_file(path: str) -> Path:
    """The local file of an adapter: the path itself, or the Hub file fetched into huggingface_hub's cache (once; a
    later call finds it there)."""
    if not path.startswith(HUB_PREFIX):
        local = Path(path)
        if not local.is_file():
            raise UserError(f"validation adapter {path}: no such file (give a .safetensors file or "
                            f"{HUB_PREFIX}owner/repo/file.safetensors)")
        return local
    hub = parse_hub_file(path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision))
    except GatedRepoError:
        raise UserError(f"validation adapter {path}: the repo is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"validation adapter {path}: no repo {hub.repo_id} on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"validation adapter {path}: the repo has no revision {hub.revision!r}") from None
    except (EntryNotFoundError, RemoteEntryNotFoundError):
        raise UserError(f"validation adapter {path}: {hub.repo_id} has no file {hub.filename}") from None
    except LocalEntryNotFoundError:
        raise UserError(f"validation adapter {path}: not in the Hub cache and the Hub cannot be reached (offline): "
                        "download it once online, or give a local file") from None
    except Exception as err:  # noqa: BLE001 - HfHubHTTPError, the connection's own errors: not a bug of wanforge
        raise UserError(f"validation adapter {path}: download failed ({str(err).splitlines()[0][:200]})") from None


@lru_cache(maxsize=8)
def _converted(file: str, mtime: float) -> tuple[dict[str, torch.Tensor], str, tuple[str, ...]]:
    """(diffusers-named tensors, the file's format, its own keys), kept for the next validation round."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"validation adapter {file}: not a readable .safetensors file ({err})") from None
    try:
        converted, fmt = convert_lora(tensors)
    except AdapterFileError as err:
        raise UserError(f"validation adapter {file} {err}") from None
    return converted, fmt, tuple(tensors)


def linear_shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer by module path, as the model is now (a layer peft wraps counts as its base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    shapes = {}
    for name, module in model.named_modules():
        if _PEFT_INTERNAL.search(name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, torch.nn.Linear):
            shapes[name] = (base.in_features, base.out_features)
    return shapes


def applicable_state(path: str, model: torch.nn.Module, slot: str) -> tuple[dict[str, torch.Tensor], AdapterReport]:
    """The converted keys of `path` that load into `model` (errors raise a UserError; keys that would not apply are
    logged once per file and expert)."""
    file = adapter_file(path)
    converted, fmt, source = _converted(str(file), file.stat().st_mtime)
    report = analyse(source, {k: tuple(v.shape) for k, v in converted.items()}, fmt, linear_shapes_of(model))
    if report.errors:
        raise UserError(f"validation adapter {path}: {report.errors[0]}")
    if (str(file), slot) not in _REPORTED:
        _REPORTED.add((str(file), slot))
        for line in report.not_applied:
            log.warning("validation adapter %s (%s): not applied: %s", path, slot, line)
    return {k: v for k, v in converted.items() if k in report.applied_keys}, report


class _Restore:
    """Everything `stacked_adapters` changes on one transformer, to put back."""

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = model
        self.tuners = {n: (list(m.active_adapters), dict(m.scaling)) for n, m in model.named_modules()
                       if isinstance(m, BaseTunerLayer)}
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.config = dict(model.peft_config) if hasattr(model, "peft_config") else None
        self.loaded_flag = getattr(model, "_hf_peft_config_loaded", None)
        self.added: list[str] = []

    @property
    def run_adapters(self) -> list[str]:
        """The adapters the model had before (the run's LoRA): the render keeps them on, at its lora_strength."""
        return list(self.config or {})

    def restore(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.model
        if self.added:
            model.delete_adapters(self.added)
        for name, module in list(model.named_modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            if name not in self.tuners:  # wrapped only for the stacked adapters: the plain layer goes back
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
                continue
            active, scaling = self.tuners[name]
            module.set_adapter(active)
            module.scaling.update(scaling)
        for p, grad in self.grads:
            p.requires_grad_(grad)
        if self.config is None:
            if hasattr(model, "peft_config"):
                del model.peft_config
        else:
            model.peft_config = self.config
        if self.loaded_flag is not None:
            model._hf_peft_config_loaded = self.loaded_flag
        elif hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False


def _targets(slots: dict, expert: str, path: str) -> list[str]:
    if "all" in slots:
        if expert != "both":
            raise UserError(f'validation adapter {path}: expert = "{expert}" names a Wan 2.2 A14B expert, and this '
                            'model has none: use expert = "both"')
        return ["all"]
    names = [s for s in slots if expert in ("both", s)]
    if not names:
        log.warning('validation adapter %s (expert = "%s") is not used: validation renders with the %s expert alone '
                    "(set model.wan_validation_load_other_stage = true to render with both)", path, expert,
                    ", ".join(slots))
    return names


def _load(pipe, model, state: dict[str, torch.Tensor], name: str) -> None:
    """diffusers' loader, into the slot `model` occupies in the pipeline."""
    import warnings

    kwargs = {"load_into_transformer_2": True} if model is getattr(pipe, "transformer_2", None) else {}
    with warnings.catch_warnings():  # peft's note that the model now has several adapters: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(state, adapter_name=name, **kwargs)


def _placed(model: torch.nn.Module, name: str) -> set[str]:
    """The layers the named adapter sits on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {})}


@contextmanager
def stacked_adapters(pipe, settings) -> Iterator[None]:
    """The render's extra adapters on their experts beside the run's LoRA (at settings.lora_strength), for the `with`
    block; each transformer is back as it was afterwards, also when the render fails."""
    if not settings.adapters and settings.lora_strength == 1.0:
        yield
        return
    slots = getattr(pipe, "wanforge_experts", None) or {"all": pipe.transformer}
    restores = {slot: _Restore(model) for slot, model in slots.items()}
    try:
        strengths: dict[str, dict[str, float]] = {slot: {} for slot in slots}
        for i, spec in enumerate(settings.adapters):
            for slot in _targets(slots, spec.expert, spec.path):
                model = slots[slot]
                state, report = applicable_state(spec.path, model, slot)
                name = f"wanforge_{settings.render or 'render'}_{i}"
                _load(pipe, model, state, name)
                restores[slot].added.append(name)
                # every applicable key must have landed (diffusers may add zero image layers to a T2V LoRA on Wan 2.1 I2V)
                missing = report.layers - _placed(model, name)
                if missing:
                    raise RuntimeError(f"validation adapter {spec.path}: diffusers did not place it on {len(missing)} "
                                       f"layers of the {slot} transformer, e.g. {sorted(missing)[0]}")
                strengths[slot][name] = spec.strength
        for slot, model in slots.items():
            run = restores[slot].run_adapters
            names = run + list(strengths[slot])
            if names:
                model.set_adapters(names, [settings.lora_strength] * len(run) + list(strengths[slot].values()))
        yield
    finally:
        for restore in restores.values():
            restore.restore()
