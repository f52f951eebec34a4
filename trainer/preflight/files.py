"""Preflight checks of the files and folders a config names: prompt library, webhook, LyCORIS and CREPA files, model
and dataset paths, metadata tables, the run folder and --resume (trainer.preflight runs them)."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import UserError
from trainer.flavours import FLAVOURS
from trainer.jsonfile import read_lycoris_config

if TYPE_CHECKING:
    from trainer.preflight.report import PreflightRun

LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "glora", "full", "diag-oft", "boft", "ia3", "tlora")
LYCORIS_KEYS = {"algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "dropout", "rank_dropout",
                "module_dropout", "use_tucker", "use_scalar", "block_size", "train_norm", "constraint", "rescaled",
                "dora_wd", "wd_on_output", "full_matrix", "bypass_mode", "unbalanced_factorization", "factor",
                "decompose_both", "preset", "apply_preset", "disable_conv_cp", "use_cp", "use_conv_cp", "constrain",
                "warn_on_unmatched", "train_llm_adapter"}


def check_prompts(run: PreflightRun) -> None:
    from trainer.outputs.prompts import fill_token, load_prompt_library

    v = run.cfg.validation
    if v.prompt:
        fill_token(v.prompt, v.instance_prompt, "validation.prompt")
    if v.prompt_library is not None:
        for nickname, text in load_prompt_library(v.prompt_library).items():
            fill_token(text, v.instance_prompt, f"validation.prompt_library {nickname!r}")


def check_webhook(run: PreflightRun) -> None:
    path = run.cfg.tracking.webhook_config
    if path is None:
        return
    from trainer.outputs.webhooks import load_webhook_config

    try:
        load_webhook_config(path)
    except (ValueError, TypeError) as err:  # a value of the wrong type, e.g. "timeout_s": "ten"
        run.error(f"tracking.webhook_config ({path}): a value has the wrong type ({err}): timeout_s is a number of "
                  "seconds, e.g. 10")


def check_hub_repo(run: PreflightRun) -> None:
    repo = run.cfg.hub.hub_model_id
    problem = _hub_id_problem(repo) if repo else None
    if problem:
        run.error(f"hub.hub_model_id: {repo!r} is not a valid Hub repo id ({problem}): use letters, digits, "
                  '"-", "_" and "." as in "your-user/your-lora"')


def check_lycoris(run: PreflightRun) -> None:
    lora = run.cfg.lora
    if lora.lora_type != "lycoris" or lora.lycoris_config is None:
        return
    data = read_lycoris_config(lora.lycoris_config)
    algo = str(data["algo"]).lower()
    if algo not in LYCORIS_ALGOS:
        close = difflib.get_close_matches(algo, LYCORIS_ALGOS, n=1)
        run.error(f'lora.lycoris_config: algo "{data["algo"]}" is not a LyCORIS algorithm: '
                  + (f'did you mean "{close[0]}"?' if close else "use " + ", ".join(LYCORIS_ALGOS)))
    for key in data:
        if key not in LYCORIS_KEYS:
            close = difflib.get_close_matches(key, sorted(LYCORIS_KEYS), n=1)
            run.error(f'lora.lycoris_config: unknown key "{key}" (lycoris would ignore it): '
                      + (f'did you mean "{close[0]}"?' if close else "remove it"))
    for key, example in (("linear_dim", 16), ("conv_dim", 16), ("factor", 16), ("block_size", 4)):
        value = data.get(key)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not (whole and (value >= 1 or (key == "factor" and value == -1))):
            run.error(f"lora.lycoris_config: {key} = {value!r} must be a whole number, 1 or more: try {example}")
    for key in ("multiplier", "linear_alpha", "conv_alpha", "dropout"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            run.error(f"lora.lycoris_config: {key} = {value!r} must be a finite number: try 1")


def check_crepa(run: PreflightRun) -> None:
    c = run.cfg.crepa
    if not c.enabled or not c.encoder_path:
        return
    path = Path(c.encoder_path)
    if not path.is_dir():
        raise UserError(f"crepa.encoder_path: {path} is not a folder: point it at a dinov2 repo clone (hubconf.py) or "
                        "a transformers Dinov2 folder (config.json), or remove it to use torch hub")
    if not (path / "hubconf.py").is_file() and not (path / "config.json").is_file():
        raise UserError(f"crepa.encoder_path: {path} is neither a dinov2 repo clone (hubconf.py) nor a transformers "
                        "Dinov2 folder (config.json): point it at one of them")


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~", "\\")) or (len(value) > 1 and value[1] == ":") or value.count("/") > 1 \
        or Path(value).exists()


def _hub_id_problem(value: str) -> str | None:
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        return str(err).splitlines()[0]
    return None


def check_model_paths(run: PreflightRun) -> None:
    m = run.cfg.model
    checks = (("pretrained_model_name_or_path", "folder"), ("pretrained_transformer_model_name_or_path", "any"),
              ("pretrained_vae_model_name_or_path", "any"))
    for name, kind in checks:
        value = getattr(m, name)
        if not value:
            continue
        where = f"model.{name}"
        if _looks_like_path(value):
            path = Path(value)
            if not path.exists():
                run.error(f"{where}: {value} does not exist: fix the path, or give a Hugging Face repo id (user/name)")
            elif path.is_file() and kind == "folder":
                run.error(f"{where}: {value} is a file: give the pipeline folder (diffusers layout, with "
                          "model_index.json); for one .safetensors transformer use pretrained_transformer_model_name_or_path")
            elif name == "pretrained_model_name_or_path" and not (path / run.flavour.expert_subfolder / "config.json").is_file():
                run.error(f"{where}: {value} has no {run.flavour.expert_subfolder}/config.json: it must be a pipeline "
                          "folder in the diffusers layout (e.g. a download of the flavour's Hub repo)")
            elif name == "pretrained_transformer_model_name_or_path" and path.is_file() and path.suffix != ".safetensors":
                run.error(f"{where}: {value} must be a .safetensors file or a folder (pickled .ckpt/.pt are not loaded)")
            elif name == "pretrained_transformer_model_name_or_path" and path.is_dir():
                sub = m.pretrained_transformer_subfolder
                if not ((path / sub) if sub else path).joinpath("config.json").is_file():
                    fix = 'pretrained_transformer_subfolder = "none"' if (path / "config.json").is_file() else \
                        "point it at a diffusers transformer folder"
                    run.error(f"{where}: {value} has no {sub + '/' if sub else ''}config.json: {fix}")
        else:
            problem = _hub_id_problem(value)
            if problem:
                run.error(f"{where}: {value!r} is neither a folder here nor a Hub repo id ({problem}): fix it")
            elif name == "pretrained_model_name_or_path" and value.startswith("Wan-AI/") \
                    and not value.endswith("-Diffusers"):
                run.error(f"{where}: {value} is the original Wan layout, which diffusers does not load as a pipeline: "
                          f"try {value}-Diffusers")
    _transformer_matches_flavour(run)


def _transformer_matches_flavour(run: PreflightRun) -> None:
    """A local transformer (config.json on disk) must have the flavour's input channels, or step 1 fails."""
    from trainer.model.wan_layout import transformer_config_file

    file = transformer_config_file(run.cfg.model, run.flavour)
    try:
        channels = json.loads(file.read_text(encoding="utf-8")).get("in_channels") if file is not None else None
    except (OSError, ValueError):
        return
    if isinstance(channels, int) and channels != run.flavour.in_channels:
        fits = [f.name for f in FLAVOURS.values() if f.in_channels == channels and f.hub_id is not None]
        run.error(f"model.flavour = \"{run.flavour.name}\" expects a transformer with {run.flavour.in_channels} input "
                  f"channels; {file.parent} has {channels}: "
                  + (f'pick the flavour of that model, e.g. "{fits[0]}"' if fits else "point the model paths at a Wan model"))


def check_dataset_paths(run: PreflightRun) -> None:
    from trainer.data.captions import metadata_path

    folders = _DatasetFolders(run)
    for i, ds in enumerate(run.cfg.datasets):
        where = f"datasets[{i}]"
        if ds.hf_repo is not None:
            problem = _hub_id_problem(ds.hf_repo)
            if problem:
                run.error(f"{where}.hf_repo: {ds.hf_repo!r} is not a Hub repo id ({problem}): use \"user/name\"")
            continue
        if ds.disabled:
            continue
        for name in ("cache_dir", "text_cache_dir"):
            value = getattr(ds, name)
            if value is not None and value.is_file():
                run.error(f"{where}.{name}: {value} is a file: give a folder (it is created if missing)")
        if ds.path.is_file():
            run.error(f"{where}.path: {ds.path} is a file: point it at the folder holding the clips ({ds.path.parent})")
            continue
        if not ds.path.is_dir():
            run.error(f"{where}.path: {ds.path} is not a folder (point it at a folder of clips + captions)")
            continue
        if ds.caption_strategy == "metadata":
            path = metadata_path(ds, ds.path)
            if path is None or not path.is_file():
                run.error(f"{where}.metadata_file: {path or ds.path / 'metadata.jsonl'} does not exist (write one row "
                          "per file with file_name and caption, or set metadata_file)")
        _cache_folders(run, i, folders)
    _run_folder_outside_data(run, folders)


def _cache_folders(run: PreflightRun, index: int, folders: _DatasetFolders) -> None:
    """A cache folder that is (or holds, or sits inside) its dataset's folder with clips in it: the scan leaves the
    cache folder out, so those clips are skipped (listed here); another dataset's folder would get cache files
    among its clips."""
    from trainer.data.sources import media_below

    ds, where = run.cfg.datasets[index], f"datasets[{index}]"
    for name in ("cache_dir", "text_cache_dir"):
        value = getattr(ds, name)
        if value is None or not value.is_dir():
            continue
        cache = value.resolve()
        path = folders.paths[index]
        own_fix = f'give the cache a folder of its own, e.g. {where}.{name} = "{path / ".wanforge_cache"}"'
        if cache == path or path in cache.parents or cache in path.parents:
            inside = media_below(cache if path in cache.parents else path)
            if inside:
                shown = ", ".join(p.name for p in inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
                what = "the dataset folder itself" if cache == path else (
                    "inside the dataset folder" if path in cache.parents else "a folder holding the dataset folder")
                run.warn(f"{where}.{name} {value} is {what}: the scan leaves the cache folder out, so {len(inside)} "
                         f"clip(s) in it are skipped ({shown}): {own_fix}")
        for j in folders.holding(cache):
            if j != index and not run.cfg.datasets[j].disabled:
                run.warn(f"{where}.{name} {value} is (or holds) datasets[{j}]'s folder: the cache files would be "
                         f"written among its clips: {own_fix}")


class _DatasetFolders:
    """Every dataset's resolved folder, and which datasets a folder is or holds, in one pass (so thousands of
    datasets check in linear time)."""

    def __init__(self, run: PreflightRun) -> None:
        self.paths = [d.path.resolve() for d in run.cfg.datasets]
        self.below: dict[Path, list[int]] = {}
        self.at: dict[Path, list[int]] = {}
        for i, path in enumerate(self.paths):
            if run.cfg.datasets[i].disabled:
                continue
            self.at.setdefault(path, []).append(i)
            for folder in (path, *path.parents):
                self.below.setdefault(folder, []).append(i)

    def holding(self, folder: Path) -> list[int]:
        """The datasets whose folder is `folder` or lies inside it."""
        return self.below.get(folder, [])

    def around(self, folder: Path) -> list[int]:
        """The datasets whose folder is `folder` or holds it."""
        return [i for p in (folder, *folder.parents) for i in self.at.get(p, [])]


def _run_folder_outside_data(run: PreflightRun, folders: _DatasetFolders) -> None:
    """The run folder inside a dataset would feed its own validation videos back as training clips (the scan also
    skips any run folder it meets, so a later run never trains on them either); a dataset inside a run's outputs
    is those videos."""
    out = run.cfg.train.output_dir.resolve()
    for i in folders.around(out):
        run.error(f"train.output_dir {out} is inside datasets[{i}].path ({folders.paths[i]}): the run's validation "
                  f"videos would be scanned as training clips: put the run folder elsewhere, e.g. train.output_dir = "
                  f"\"{_outside(folders, out)}\"")
    for name in ("validation", "checkpoints", "lora"):
        for i in folders.holding(out / name):
            run.error(f"datasets[{i}].path {folders.paths[i]} is inside the run folder's outputs ({out}): those are "
                      "the run's own videos: point it at a folder of training clips")


def _outside(folders: _DatasetFolders, out: Path) -> Path:
    """A run folder beside the outermost dataset that holds `out`, inside no dataset."""
    top = min((folders.paths[i] for i in folders.around(out)), key=lambda p: len(p.parts))
    candidate = top.parent / f"{top.name or 'data'}-runs" / out.name
    if folders.around(candidate):
        candidate = Path.home() / "wanforge-runs" / out.name
    return candidate


# ---------------------------------------------------------------- the run folder


def check_output_dir(run: PreflightRun) -> None:
    out = run.cfg.train.output_dir
    if out.is_file():
        run.error(f"train.output_dir: {out} is a file: give a folder for the run (it is created if missing)")


def check_resume(run: PreflightRun) -> None:
    from trainer.preflight.tensors import RESUMED_FILES, require_finite_checkpoint
    from trainer.rundir import RunDir

    folder = RunDir(run.cfg.train.output_dir)
    if run.resume is not None:
        if run.resume != "latest":  # `latest` always resolves (train says which checkpoints it skips, once)
            checkpoint = folder.resolve_resume(run.resume)
        else:
            done = folder.complete_checkpoints()
            checkpoint = done[-1][1] if done else None
        if checkpoint is not None:  # weights or optimizer state with NaN / inf would only diverge later
            require_finite_checkpoint(checkpoint, RESUMED_FILES)
    elif folder.complete_checkpoints():
        run.error(f"train.output_dir: {folder.root} already has checkpoints: pass --resume latest to continue that "
                  "run, or set train.output_dir to a new folder")
