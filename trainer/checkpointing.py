"""Resumable checkpoints through accelerate's save_state / load_state, holding only the adapter (not the base model).

accelerate keeps the optimizer, the RNG states and registered objects; the hooks below swap its full-model save for
the peft adapter. A checkpoint is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.lora import adapter_state_dict, load_adapter_state_dict
from trainer.rundir import RunDir

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "wanforge_state.json"


class TrainState:
    """What accelerate doesn't know about: the optimizer step and the noise/timestep generator."""

    def __init__(self, generator: torch.Generator):
        self.step = 0
        self.generator = generator

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


def install_adapter_hooks(accelerator, adapter_name: str = "default") -> None:
    def save_hook(models, weights, output_dir):
        for model, _ in zip(list(models), list(weights)):
            state = adapter_state_dict(accelerator.unwrap_model(model), adapter_name)  # peft LoRA or LyCORIS
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(output_dir, ADAPTER_FILE))
        weights.clear()  # accelerate must not write the full base model

    def load_hook(models, input_dir):
        state = load_file(os.path.join(input_dir, ADAPTER_FILE))
        while models:
            model = accelerator.unwrap_model(models.pop())
            unexpected = load_adapter_state_dict(model, state, adapter_name)
            if unexpected:
                raise RuntimeError(f"checkpoint adapter has keys the model lacks: {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run: RunDir, step: int, keep: int | None) -> Path | None:
    """Write checkpoints/step-N atomically (temp folder, then rename); prune old ones. Main process writes."""
    final = run.checkpoint_dir(step)
    tmp = run.checkpoints / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> int:
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_FILE).read_text())["step"])
