"""What a `--resume` may change against the checkpoint's own config.toml.

Settings that steer how the rest of the run goes take effect (learning rate and schedule, max_train_steps, logging,
checkpoints, validation, memory, trackers, Hub, flow sampling). Settings that change what the saved state means or
which data comes next (model, LoRA layout, datasets, seed, batch size, optimizer type, EMA on/off, the CREPA head)
are refused by name, so config.toml always describes what trains. Anything not listed as taking effect is refused.
"""

from __future__ import annotations

import tomllib
from fnmatch import fnmatchcase
from typing import Any

import tomli_w

from trainer.config.files import to_toml_dict
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError

TAKES_EFFECT = (
    "train.max_train_steps", "train.log_every_n_steps", "train.gradient_accumulation_steps", "train.output_dir",
    "train.dataloader_num_workers", "train.mixed_precision", "train.max_grad_norm", "train.max_grad_value",
    "optim.learning_rate", "optim.adam_*", "optim.weight_decay", "optim.lr_scheduler", "optim.lr_warmup_steps",
    "flow.*", "validation.*", "memory.*", "checkpoint.*", "tracking.*", "hub.*", "cache.*", "tread.*", "scheduled_sampling.*",
    "ema.decay", "ema.update_interval", "ema.validation", "lora.save_dtype", "lora.save_format",
    "model.wan_validation_load_other_stage", "model.expert_switch_every_n_steps",
    "datasets[*].id", "datasets[*].cache_dir", "datasets[*].text_cache_dir", "datasets[*].delete_problematic",
    "crepa.weight", "crepa.adjacent_distance", "crepa.temporal_decay", "crepa.encoder_image_size",
)
_HOLDOUT_FIELDS = ("validation.eval_samples", "validation.eval_every_n_steps")  # with eval_holdout: the training set


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data) and prefix == "datasets":
        out = {"datasets": f"{len(data)} table(s)"}
        for i, value in enumerate(data):
            out.update(_flat(value, f"datasets[{i}]"))
        return out
    return {prefix: data}


def _toml_view(cfg: WanforgeConfig) -> dict[str, Any]:
    return _flat(tomllib.loads(tomli_w.dumps(to_toml_dict(cfg))))


def changed_settings(checkpoint_config: str, cfg: WanforgeConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted name -> (checkpoint's value, current value) for every setting that differs."""
    before, after = _flat(tomllib.loads(checkpoint_config)), _toml_view(cfg)
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)}


def _takes_effect(name: str, holdout: bool) -> bool:
    if name == "validation.eval_holdout" or (holdout and name in _HOLDOUT_FIELDS):
        return False
    return any(fnmatchcase(name, pattern.replace("[*]", "[[]*[]]")) for pattern in TAKES_EFFECT)


def check_resume_settings(checkpoint_config: str, cfg: WanforgeConfig, checkpoint: str) -> list[str]:
    """Raise a UserError naming every changed setting a resume can't honour; return one line per change that takes
    effect (for the log)."""
    changes = changed_settings(checkpoint_config, cfg)
    old_holdout = tomllib.loads(checkpoint_config).get("validation", {}).get("eval_holdout", False)
    holdout = bool(old_holdout or cfg.validation.eval_holdout)
    refused = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items() if not _takes_effect(k, holdout)]
    if refused:
        raise UserError(
            f"--resume {checkpoint}: these settings differ from the ones the checkpoint was trained with and can't "
            f"change mid-run: {', '.join(refused)}. Put them back (the checkpoint's settings are in "
            f"{checkpoint}/config.toml), or train them as a new run (another train.output_dir)"
        )
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()]
