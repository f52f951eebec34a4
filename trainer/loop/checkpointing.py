"""Resumable checkpoints in safetensors and JSON: no pickle is written, and none is ever read.

checkpoints/step-N/ holds
  adapter.safetensors   the trained adapter (peft LoRA, LyCORIS, or both experts), never the base model
  state.safetensors     optimizer, LR-schedule position, EMA, CREPA head, fp16 loss scale, step: the tensors, with
                        the nested structure as JSON in the file's metadata (safetensors stores flat tensors only,
                        and torch.save / accelerate's custom states are pickles, which run code when loaded)
  rng.safetensors       every rank's Python / NumPy / torch RNG states, gathered to rank 0
  config.toml           the settings that trained up to here (what a resume compares against)
  wanforge_state.json   {"step", "format", "world_size", "files": {name: {"size", "sha256"}}}, written last: without
                        it a folder is not a checkpoint, and one whose files differ from the list is not complete
                        (a bucket mount uploads asynchronously: after a preemption the newest can be partial;
                        `--resume latest` skips it, RunDir.resolve_resume)
Only rank 0 writes, into `.tmp-step-N`, after a collective that every rank must finish (so all parts exist), and
renames the folder into place when it is complete. A kill on any rank leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.errors import UserError
from trainer.fileio import atomic_save_safetensors, atomic_write_json, atomic_write_text
from trainer.model.lora import adapter_state_dict, load_adapter_state_dict
from trainer.model.sharding import full_tensors, shard_optimizer_state
from trainer.outputs.finite import require_finite
from trainer.preflight.tensors import require_finite_checkpoint
from trainer.rundir import CHECKPOINT_MARKER, RunDir, checkpoint_manifest

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.safetensors"
RNG_FILE = "rng.safetensors"
CONFIG_FILE = "config.toml"
FORMAT = 2  # 1: accelerate's pickled state (refused)
_META_KEY = "wanforge_state"


class TrainState:
    """What no library object holds: the number of optimizer steps done."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class OptimizerState:
    """The optimizer's moments, restored without its settings: on a resume the current learning rate, betas,
    epsilon and weight decay take effect (torch's load_state_dict would bring back the checkpoint's)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, state))  # sharded params: own slices
        for group, kept in zip(self.optimizer.param_groups, settings):
            group.update(kept)


class SchedulePosition:
    """Where the LR schedule stands (its step count); the schedule itself is rebuilt from the current config, so a
    changed learning rate, schedule, warmup or max_train_steps takes effect on a resume. The learning rate is
    recomputed exactly as LambdaLR.step does (every diffusers schedule is a LambdaLR)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": self.scheduler.last_epoch, "step_count": self.scheduler._step_count}

    def load_state_dict(self, state: dict) -> None:
        s = self.scheduler
        s.last_epoch, s._step_count = int(state["last_epoch"]), int(state["step_count"])
        lrs = [base * fn(s.last_epoch) for fn, base in zip(s.lr_lambdas, s.base_lrs)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = [group["lr"] for group in s.optimizer.param_groups]


# ---------------------------------------------------------------- nested state <-> (tensors, JSON)
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{path}: a key of type {type(key).__name__} has no JSON form")
        return {"dict": [[k, _flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"tuple": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: {type(obj).__name__} has no safetensors/JSON form")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"tensor"}:
        return tensors[node["tensor"]]
    if set(node) == {"tuple"}:
        return tuple(_unflatten(v, tensors) for v in node["tuple"])
    if set(node) == {"dict"}:
        return {k: _unflatten(v, tensors) for k, v in node["dict"]}
    raise ValueError(f"unknown entry {sorted(node)[:3]}")


def save_state_file(path: Path, states: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(states, tensors, "")
    atomic_save_safetensors(tensors, path, metadata={_META_KEY: json.dumps(skeleton)})


def load_state_file(path: Path) -> dict[str, Any]:
    """Read a file written by save_state_file: safetensors' own reader and json, nothing that can run code."""
    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})[_META_KEY])
        return _unflatten(skeleton, load_file(str(path)))
    except Exception as err:  # a damaged or foreign file: name it, never fall back to another loader
        raise _unreadable(path, err) from None


# ---------------------------------------------------------------- RNG states, one row per rank
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    rest = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), rest[0], rest[1],
                         float(state["numpy_gauss"][0])))
    python = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gathered_rng(accelerator) -> dict[str, torch.Tensor]:
    """Every rank's RNG states stacked [world_size, ...]: a collective, so it returns once every rank got here."""
    gathered = {}
    for name, t in _rng_state(accelerator.device).items():
        gathered[name] = accelerator.gather(t.unsqueeze(0).to(accelerator.device)).cpu()
    return gathered


# ---------------------------------------------------------------- save / load
def save_checkpoint(accelerator, run: RunDir, step: int, keep: int | None, transformer, objects: dict[str, Any],
                    config_text: str, finite_extra: list[torch.Tensor] = ()) -> Path:
    """Write checkpoints/step-N; every rank calls this. `objects`: name -> thing with state_dict/load_state_dict.
    Refuses (NonFiniteTraining) when the adapter or `finite_extra` (EMA weights) hold NaN or inf."""
    adapter = adapter_state_dict(accelerator.unwrap_model(transformer))
    require_finite({**adapter, **{f"ema.{i}": t for i, t in enumerate(finite_extra)}}, f"the adapter at step {step}")
    states = full_tensors({name: obj.state_dict() for name, obj in objects.items()})  # sharded: a collective
    rng = _gathered_rng(accelerator)  # every rank has reached the checkpoint
    final = run.checkpoint_dir(step)
    if accelerator.is_main_process:
        tmp = run.checkpoints / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        atomic_save_safetensors({k: v.detach().to("cpu", copy=True) for k, v in adapter.items()}, tmp / ADAPTER_FILE)
        save_state_file(tmp / STATE_FILE, states)
        atomic_save_safetensors(rng, tmp / RNG_FILE)
        atomic_write_text(tmp / CONFIG_FILE, config_text)
        files = checkpoint_manifest(tmp, [ADAPTER_FILE, STATE_FILE, RNG_FILE, CONFIG_FILE])
        atomic_write_json(tmp / CHECKPOINT_MARKER,  # last: it lists every file above with its size and sha256
                          {"step": step, "format": FORMAT, "world_size": accelerator.num_processes, "files": files})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a stop at a checkpoint step): swap, never delete first
            old = run.checkpoints / f".tmp-old-step-{step}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run.checkpoints)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()
    return final


def _marker(path: Path) -> dict:
    try:
        return json.loads((path / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError) as err:
        raise _unreadable(path / CHECKPOINT_MARKER, err) from None


def checkpoint_step(path: Path) -> int:
    return int(_marker(path)["step"])


def checkpoint_config(path: Path) -> str | None:
    file = path / CONFIG_FILE
    return file.read_text(encoding="utf-8") if file.is_file() else None


def verify_checkpoint(path: Path) -> int:
    """Cheap checks before a resume changes anything: the current format and readable file headers; returns the step."""
    if int(_marker(path).get("format", 1)) < FORMAT:
        raise UserError(f"{path}: written by an older wanforge as pickles, which this version never loads (a "
                        "pickle can run code): start a new run (train.output_dir), or use the LoRA in it as it is")
    for name in (ADAPTER_FILE, STATE_FILE, RNG_FILE):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                if name == STATE_FILE:
                    json.loads((f.metadata() or {})[_META_KEY])
        except Exception as err:
            raise _unreadable(path / name, err) from None
    require_finite_checkpoint(path, (ADAPTER_FILE, STATE_FILE))  # NaN weights would only diverge later
    return checkpoint_step(path)


def load_checkpoint(accelerator, path: Path, transformer, objects: dict[str, Any], optional: set[str] = frozenset()) -> int:
    """Restore the adapter, every object's state and this rank's RNG; returns the step. Reads safetensors/JSON only.
    `optional`: objects a checkpoint may lack (they keep their fresh state)."""
    verify_checkpoint(path)
    adapter = _load_tensors(path / ADAPTER_FILE)
    unexpected = load_adapter_state_dict(accelerator.unwrap_model(transformer), adapter)
    if unexpected:
        raise UserError(f"{path}: the checkpoint's adapter has keys this model lacks ({unexpected[:3]}): it belongs "
                        "to another model or LoRA layout")
    states = load_state_file(path / STATE_FILE)
    for name, obj in objects.items():
        if name not in states and name in optional:
            continue
        if name not in states:
            raise UserError(f"{path}: the checkpoint holds no {name} state (it was saved without it): resume with "
                            "the settings it was trained with")
        obj.load_state_dict(states[name])
    rng = _load_tensors(path / RNG_FILE)
    rank = accelerator.process_index
    if rank < next(iter(rng.values())).shape[0]:  # more ranks than were saved: the new ones keep their seeded RNG
        _set_rng_state({k: v[rank].clone() for k, v in rng.items()}, accelerator.device)  # own storage: set_rng_state ignores offsets
    return checkpoint_step(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> UserError:
    return UserError(f"{path}: not a readable wanforge checkpoint file ({err.__class__.__name__}: {str(err)[:200]}); "
                     f"resume from another checkpoint (--resume {path.parent.parent}/step-N)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
