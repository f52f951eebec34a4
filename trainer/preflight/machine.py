"""Preflight checks of this machine, for a run that happens here: writable folders, GPU and packages the options
need, tracker logins, Hub token, offline caches, attention kernels."""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.preflight.model import attention_backend_names

if TYPE_CHECKING:
    from trainer.preflight.report import PreflightRun

def folder_problem(path: Path) -> str | None:
    """Why a folder can't be created (or written) here, found by trying (root passes any permission test, and
    read-only mounts, files in the way, dangling links and over-long names only show when one tries); None: fine.
    Leaves nothing behind."""
    missing: list[str] = []
    at = path
    while True:
        try:
            st = os.stat(at)
            break
        except FileNotFoundError:
            if os.path.islink(at):
                return f"{at} is a link to {os.readlink(at)}, which does not exist"
        except OSError as err:
            if err.errno not in (errno.ENAMETOOLONG, errno.ENOTDIR):
                return f"{at}: {err.strerror or err}"
        if at == at.parent:
            return f"{at} does not exist"
        missing.append(at.name)
        at = at.parent
    if not stat.S_ISDIR(st.st_mode):
        return f"{at} is a file, not a folder"
    try:
        longest = os.pathconf(at, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    long_names = [n for n in missing if len(n.encode()) > longest]
    if long_names:
        return f"the folder name {long_names[0][:40]}... is longer than the {longest} bytes this filesystem allows"
    try:
        probe = tempfile.mkdtemp(prefix=".wanforge-check-", dir=at)
        os.rmdir(probe)
    except OSError as err:
        return f"{at} can't be written here ({err.strerror or err})"
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "WANFORGE_OFFLINE"))


def _torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch" / "hub"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_environment(run: PreflightRun) -> None:
    cfg = run.cfg
    problem = folder_problem(cfg.train.output_dir)
    if problem:
        run.error(f"train.output_dir: {cfg.train.output_dir} can't be created here ({problem}): choose a folder you "
                  "can write")
    checked: dict[Path, str | None] = {}
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled or not ds.path.is_dir():
            continue
        cache = ds.cache_dir if ds.cache_dir is not None else ds.path / ".wanforge_cache"
        for name, folder in (("cache_dir", cache), ("text_cache_dir", ds.text_cache_dir)):
            if folder is None:
                continue
            if folder not in checked:
                checked[folder] = folder_problem(folder)
            if checked[folder]:
                run.error(f"datasets[{i}].{name}: {folder} can't be created here ({checked[folder]}; a read-only "
                          f"dataset?): set datasets[{i}].{name} to a folder you can write")
    if cfg.optim.optimizer == "adamw8bit":
        if not _installed("bitsandbytes"):
            run.error('optim.optimizer = "adamw8bit" needs bitsandbytes: pip install bitsandbytes, or use "adamw"')
        elif not _cuda():
            run.error('optim.optimizer = "adamw8bit" needs a CUDA GPU: use "adamw" on this machine')
    if cfg.memory.base_quantization == "fp8" or cfg.memory.preset == "balanced-fp8":
        _fp8_device(run)
    if cfg.lora.lora_type == "lycoris" and not _installed("lycoris"):
        run.error('lora.lora_type = "lycoris" needs the lycoris-lora package: pip install lycoris-lora')
    if cfg.tracking.report_to == "wandb":
        if not _installed("wandb"):
            run.error('tracking.report_to = "wandb" needs wandb: pip install wandb, or report_to = "none"')
        elif not _wandb_login():
            run.error('tracking.report_to = "wandb": no W&B login here: set WANDB_API_KEY (or run `wandb login`), '
                      'or report_to = "none"')
    if cfg.tracking.report_to == "tensorboard" and not (_installed("tensorboard") or _installed("tensorboardX")):
        run.error('tracking.report_to = "tensorboard" needs tensorboard: pip install tensorboard, or report_to = "none"')
    if cfg.hub.push_to_hub or cfg.hub.push_checkpoints_to_hub:
        _hub_token(run)
    if cfg.crepa.enabled and not cfg.crepa.encoder_path and _offline() \
            and not (_torch_hub_dir() / "facebookresearch_dinov2_main").is_dir():
        run.error(f"crepa: {cfg.crepa.encoder} is not in the torch hub cache ({_torch_hub_dir()}) and this run is "
                  "offline: download it once online, or set crepa.encoder_path to a local dinov2 clone or Dinov2 folder")
    if _offline() and not cfg.model.pretrained_model_name_or_path and run.flavour.hub_id is not None:
        from trainer.model.wan_layout import transformer_config_file

        if transformer_config_file(cfg.model, run.flavour) is None:
            run.warn(f"model: {run.flavour.hub_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                     "training here would stop at loading it; download it once online, or set "
                     "model.pretrained_model_name_or_path to a local copy")
    _attention_requirements(run)
    _streamed_weights_fit(run)


def _streamed_weights_fit(run: PreflightRun) -> None:
    """Weight streaming keeps the streamed blocks' base weights in page-locked host RAM: they must fit the free RAM
    (the activation offload, by contrast, stays on the GPU where the host is full)."""
    from trainer.model.sizing import flavour_shape, host_memory_gib, streamed_count, streamed_gib
    from trainer.preflight.model import effective_memory

    try:
        memory = effective_memory(run)
    except ValueError:
        return  # check_streaming says why
    shape = flavour_shape(run.flavour.name)
    count = streamed_count(memory.model_dump(), shape.layers)
    need = streamed_gib(shape, memory.base_quantization, run.cfg.model.base_dtype, count)
    free = host_memory_gib()
    if count and free and need > 0.9 * free:
        per_block = need / count
        fits = int(0.9 * free / per_block)
        run.error(f"memory.streamed_blocks: {count} streamed blocks keep {need:.1f} GiB of base weights in host RAM, "
                  f"this machine has {free:.1f} GiB free: free host RAM, or set memory.streamed_blocks = {fits} "
                  "(more weights stay on the GPU)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fp8_device(run: PreflightRun) -> None:
    import torch

    if not torch.cuda.is_available():
        return  # CPU runs fp8 slowly (tests); fp8.check_float8_device says the same
    from trainer.model.fp8 import check_float8_device

    check_float8_device(torch.device("cuda"))


def _wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _hub_token(run: PreflightRun) -> None:
    try:
        from huggingface_hub import get_token
    except ImportError:
        run.error("hub.push_to_hub needs huggingface_hub: pip install huggingface_hub")
        return
    if get_token() is None:
        run.error("hub.push_to_hub: no Hugging Face token found: set HF_TOKEN in the environment (a write token; "
                  "on SkyPilot pass --secret HF_TOKEN, in Colab add an HF_TOKEN secret)")


def _attention_requirements(run: PreflightRun) -> None:
    """The packages a named backend needs, as diffusers itself checks them (auto and the torch ones need none)."""
    name = run.cfg.memory.attention_backend
    if name == "auto" or name.startswith("_native") or name == "native" or name not in (attention_backend_names() or []):
        return
    from trainer.model.attention import FLASH_4, flash_attn_4_installed

    if name == FLASH_4 and flash_attn_4_installed():
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as err:
        run.error(f'memory.attention_backend = "{name}" is not usable here ({err}): use "auto"')
