"""The one preflight: every user error `train` could raise before its first step, found without loading weights.

`check`, `train` (before caching), `cache`, `launch` (before anything is rented) and the notebook form call it.
It reads the config file, the files the config names, the model's names (from the flavour and the model's
config.json where it is on disk) and the dataset scan, and returns a report: errors (one line each, naming the field
or file and a fix that is itself a valid value) and warnings (legal but probably not meant). Torch-free at import;
`here=True` adds what depends on this machine (GPU, installed packages, tokens, writable folders).
Anything `train` refuses later that a config could have told is a bug here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config.files import apply_override, config_from_dict, read_config_data
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError
from trainer.model.context_parallel import check_context_parallel
from trainer.model.sharding import check_shard_base
from trainer.preflight.adapters import check_validation_adapter_keys, check_validation_renders
from trainer.preflight.files import (check_crepa, check_dataset_paths, check_hub_repo, check_lycoris, check_model_paths,
                                     check_output_dir, check_prompts, check_resume, check_webhook)
from trainer.preflight.machine import check_environment
from trainer.preflight.model import (check_adapter_saveable, check_attention_backend, check_block_indices, check_experts,
                                     check_rotary_positions, check_streaming, check_target_modules)


from trainer.preflight.report import PreflightReport, PreflightRun
from trainer.preflight.vace import check_vace
from trainer.preflight.values import check_frames_and_sizes, check_numbers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- entry points


def check_config_file(path: str | Path, overrides: list[str] | None = None, **options: Any) -> PreflightReport:
    """`wanforge check CONFIG [--set ...]`: read, override, validate and preflight; every problem in the report."""
    path = Path(path)
    report = PreflightReport()
    try:
        data = read_config_data(path)
        raw = _copy(data)
        for assignment in overrides or []:
            apply_override(data, assignment)
        cfg = config_from_dict(data, source=str(path), base_dir=path.parent.resolve())
    except UserError as err:
        report.errors = [line for line in str(err).splitlines() if line.strip()]
        return report
    result = preflight(cfg, **options)
    result.warnings[:0] = _raw_warnings(raw, str(path))
    return result


def preflight(cfg: WanforgeConfig, *, resume: str | None = None, here: bool = True, scan: bool = True,
              num_processes: int | None = None, torch_free: bool = False, training: bool = True) -> PreflightReport:
    """Every problem of a validated config that would stop `train` before (or at the end of) its run.

    here: the run happens on this machine (GPU, packages, tokens, writable folders are checked); scan: scan the
    datasets (buckets, captions, too-small datasets); num_processes: GPUs of the run (default: WORLD_SIZE);
    torch_free: skip the checks that import torch or diffusers (the notebook form); training: False for `cache`
    (the run folder and --resume are not its business)."""
    processes = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    run = PreflightRun(cfg, PreflightReport(config=cfg), here, processes, resume)
    checks: list[Callable[[PreflightRun], None]] = [
        check_numbers, check_frames_and_sizes, check_prompts, check_webhook, check_hub_repo, check_lycoris, check_crepa, check_model_paths, check_dataset_paths,
        check_target_modules, check_block_indices, check_rotary_positions, check_attention_backend, check_experts,
        check_validation_renders, check_vace, check_streaming,
    ]
    if training:  # `cache` is one process whatever the training layout
        checks += [check_shard_base, check_context_parallel]
    if training and here:
        checks += [check_output_dir, check_resume]
    if not torch_free:
        checks += [check_adapter_saveable, check_validation_adapter_keys]
    if here:
        checks.append(check_environment)
    for check in checks:
        run.run(check)
    remote_data = not here and any(d.hf_repo for d in cfg.datasets)  # not downloaded to the laptop to be scanned
    if scan and not remote_data and not any(e.startswith("datasets[") for e in run.report.errors):
        run.run(_scan)
    return run.report


def _raw_warnings(raw: dict[str, Any], source: str) -> list[str]:
    """Values the schema rounds: said out loud instead of silently changed."""
    out = []
    tables = [(f"datasets[{i}]", d) for i, d in enumerate(raw.get("datasets", []) or []) if isinstance(d, dict)]
    if isinstance(raw.get("validation"), dict):
        tables.append(("validation", raw["validation"]))
    for where, table in tables:
        n = table.get("num_frames")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n - 1) % 4:
            out.append(f"{source}: {where}.num_frames = {n} is not 4k+1 (the Wan VAE packs 4 frames into one): "
                       f"{round((n - 1) / 4) * 4 + 1} is used")
    return out


def _copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


# ---------------------------------------------------------------- the datasets


def _scan(run: PreflightRun) -> None:
    from trainer.data.discovery import dataset_findings

    found = dataset_findings(run.cfg, run.num_processes)
    run.report.buckets = found.report
    for line in found.problems:
        run.error(line)
    for line in found.warnings:
        run.warn(line)
