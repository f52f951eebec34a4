"""The one preflight: every user error `train` could raise before its first step, found without loading weights.

`check`, `train` (before caching), `cache`, `launch` (before anything is rented) and the notebook form call it.
It reads the config file, the files the config names, the model's names (from the flavour and the model's
config.json where it is on disk) and the dataset scan, and returns a report: errors (one line each, naming the field
or file and a fix that is itself a valid value) and warnings (legal but probably not meant). Torch-free at import;
`here=True` adds what depends on this machine (GPU, installed packages, tokens, writable folders).
Anything `train` refuses later that a config could have told is a bug here.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import WanforgeConfig, apply_override, config_from_dict, read_config_data
from trainer.errors import UserError
from trainer.flavours import FLAVOURS, Flavour
from trainer.jsonfile import read_json_object
from trainer.wan_layout import ADAPTABLE, block_count, matching_modules, module_layout, resolve_routes

log = logging.getLogger(__name__)

LR_SUSPICIOUS = 1e-2  # above this a LoRA learning rate is a warning; above 1 an error (a mistyped exponent)
MAX_FRAME_PIXELS = 4096 * 2160  # larger frames than 4K: a unit mix-up, not a training size
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "glora", "full", "diag-oft", "boft", "ia3", "tlora")
LYCORIS_KEYS = {"algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "dropout", "rank_dropout",
                "module_dropout", "use_tucker", "use_scalar", "block_size", "train_norm", "constraint", "rescaled",
                "dora_wd", "wd_on_output", "full_matrix", "bypass_mode", "unbalanced_factorization", "factor",
                "decompose_both", "preset", "apply_preset", "disable_conv_cp", "use_cp", "use_conv_cp", "constrain",
                "warn_on_unmatched", "train_llm_adapter"}


@dataclass
class PreflightReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)  # the dataset scan's report lines
    config: WanforgeConfig | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_invalid(self) -> None:
        """Log the warnings; raise every error as one UserError (one line per problem)."""
        for line in self.warnings:
            log.warning(line)
        if self.errors:
            raise UserError("\n".join(self.errors))


@dataclass
class _Run:
    """What one preflight pass knows: the config, where it runs, and the report it fills."""

    cfg: WanforgeConfig
    report: PreflightReport
    here: bool
    num_processes: int
    resume: str | None
    flavour: Flavour = field(init=False)
    blocks: int = field(init=False)

    def __post_init__(self) -> None:
        self.flavour = FLAVOURS[self.cfg.model.flavour]
        self.blocks = block_count(self.cfg.model, self.flavour)

    def error(self, line: str) -> None:
        self.report.errors.append(line)

    def warn(self, line: str) -> None:
        self.report.warnings.append(line)

    def run(self, check: Callable[[_Run], None]) -> None:
        """A check that raises a UserError (a reused engine function) adds it and the rest still run."""
        try:
            check(self)
        except UserError as err:
            self.report.errors.extend(line for line in str(err).splitlines() if line.strip())


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
    run = _Run(cfg, PreflightReport(config=cfg), here, processes, resume)
    checks: list[Callable[[_Run], None]] = [
        _numbers, _frames_and_sizes, _prompts, _webhook, _hub_repo, _lycoris, _crepa, _model_paths, _dataset_paths,
        _target_modules, _block_indices, _attention_backend, _experts,
    ]
    if training and here:
        checks += [_output_dir, _resume]
    if not torch_free:
        checks.append(_adapter_saveable)
    if here:
        checks.append(_environment)
    for check in checks:
        run.run(check)
    remote_data = not here and any(d.hf_repo for d in cfg.datasets)  # not downloaded to the laptop to be scanned
    if scan and not remote_data and not any(e.startswith("datasets[") for e in run.report.errors):
        run.run(_scan)
    return run.report


# ---------------------------------------------------------------- values


def _numbers(run: _Run) -> None:
    cfg = run.cfg
    lr = cfg.optim.learning_rate
    if lr > 1:
        exponent = round(math.log10(lr))
        fix = f"did you mean {10.0 ** -exponent:g}?" if abs(lr - 10.0 ** exponent) / lr < 1e-9 else "try 0.0001"
        run.error(f"optim.learning_rate = {lr:g}: no LoRA trains at a learning rate above 1 (it diverges to nan at "
                  f"once): {fix}")
    elif lr > LR_SUSPICIOUS:
        run.warn(f"optim.learning_rate = {lr:g} is high for a LoRA (1e-4 is usual, 1e-3 already aggressive): "
                 "expect divergence")
    if cfg.optim.lr_scheduler != "constant" and cfg.optim.lr_warmup_steps >= cfg.train.max_train_steps:
        run.warn(f"optim.lr_warmup_steps = {cfg.optim.lr_warmup_steps} is not below train.max_train_steps = "
                 f"{cfg.train.max_train_steps}: the run never reaches its learning rate")
    if cfg.train.max_grad_norm is None and cfg.train.max_grad_value is None and lr > 1e-3:
        run.warn(f"train: no gradient clipping with optim.learning_rate = {lr:g}: a spike can make the LoRA nan")
    for i, ds in enumerate(cfg.datasets):
        if ds.caption_dropout_probability >= 0.5:
            run.warn(f"datasets[{i}].caption_dropout_probability = {ds.caption_dropout_probability:g}: most samples "
                     "train without their caption (0.05-0.1 is usual)")
    if cfg.lora.rank > 512:
        run.warn(f"lora.rank = {cfg.lora.rank}: far above the 16-128 LoRAs use (a rank near the layer width is a "
                 "full fine-tune in slow motion)")
    if cfg.train.text_max_length > 512:
        run.error(f"train.text_max_length = {cfg.train.text_max_length}: the Wan pipelines use 512 text tokens, so "
                  "longer embeddings train a model validation and inference never see: try 512")
    if cfg.model.wan_force_2_1_time_embedding and not run.flavour.expand_timesteps:
        run.warn(f"model.wan_force_2_1_time_embedding is for TI2V-5B only and is ignored by {run.flavour.name}")
    if run.flavour.boundary is not None:
        _expert_noise_levels(run)


def _expert_noise_levels(run: _Run) -> None:
    """Wan 2.2 A14B: the flow distribution must put noise levels on the trained expert's side of the boundary."""
    flow, b = run.cfg.flow, run.flavour.boundary
    if flow.timestep_sampling == "uniform":
        above = 1 - b
    elif flow.timestep_sampling == "shift":
        above = 1 - b / (flow.shift - (flow.shift - 1) * b)
    else:
        z = (math.log(b / (1 - b)) - flow.logit_mean) / flow.logit_std
        above = 0.5 * math.erfc(z / math.sqrt(2))
    sides = ("high", "low") if run.cfg.model.train_both_experts else (run.flavour.stage,)
    for side in sides:
        share = above if side == "high" else 1 - above
        if share < 0.01:
            run.error(f"flow: only {share:.2%} of the noise levels fall on the {side}-noise side of the expert "
                      f"boundary {b}: that expert would almost never train: try flow.timestep_sampling = \"uniform\"")


def _size_units(value: float, kind: str, field_name: str) -> str | None:
    """Why a size in resolution_type units is not meant (None: plausible), with a converted value to try."""
    if value <= 0:
        return f"{field_name} = {value:g} must be above 0"
    if kind == "area" and value > MAX_FRAME_PIXELS / 1e6:
        return (f"{field_name} = {value:g} means {value:g} megapixels (resolution_type = \"area\"): did you mean "
                f"{round(value * value / 1e6, 2):g}, the area of a {value:g}-pixel square?")
    if kind != "area" and value < 8:
        return (f"{field_name} = {value:g} means {value:g} pixels (resolution_type = \"{kind}\"): did you mean "
                f"{round(math.sqrt(value * 1e6)):d}, the side of a {value:g}-megapixel square?")
    if kind != "area" and value * value > MAX_FRAME_PIXELS * 4:
        return f"{field_name} = {value:g} pixels is far beyond any video model's frame: try 632 (832x480)"
    return None


def _frames_and_sizes(run: _Run) -> None:
    cfg, f = run.cfg, run.flavour
    from trainer.buckets import size_multiple

    m = size_multiple(f)
    for i, ds in enumerate(cfg.datasets):
        where = f"datasets[{i}]"
        for name in ("resolution", "minimum_image_size", "maximum_image_size", "target_downsample_size"):
            value = getattr(ds, name)
            if value is not None:
                why = _size_units(value, ds.resolution_type, f"{where}.{name}")
                if why:
                    run.error(why)
        if ds.width is not None and ds.resolution is not None:
            run.warn(f"{where}: width and height are set, so resolution = {ds.resolution:g} is ignored")
        frames = ds.num_frames or f.num_frames
        if ds.min_frames is not None and ds.min_frames > frames:
            run.warn(f"{where}.min_frames = {ds.min_frames} is above num_frames = {frames}: clips need only "
                     f"{frames} frames (set min_frames <= num_frames)")
        needed = min(ds.min_frames or frames, frames)
        if ds.max_frames is not None and ds.max_frames < needed:
            run.error(f"{where}.max_frames = {ds.max_frames} is below the {needed} frames a clip needs "
                      f"(min_frames / num_frames), so no video can train: try max_frames = none (no limit)")
        if ds.caption_strategy == "textfile" and not ds.caption_extension.startswith("."):
            run.error(f'{where}.caption_extension = "{ds.caption_extension}" must start with a dot: try '
                      f'".{ds.caption_extension.lstrip(".") or "txt"}"')
        if ds.maximum_image_size is not None and ds.target_downsample_size is not None \
                and ds.target_downsample_size > ds.maximum_image_size:
            run.warn(f"{where}.target_downsample_size = {ds.target_downsample_size:g} is above maximum_image_size = "
                     f"{ds.maximum_image_size:g}: large samples would be scaled up, not down")
    v = cfg.validation
    for name in ("width", "height"):
        value = getattr(v, name)
        if value is not None and value % m:
            run.error(f"validation.{name} = {value} must be a multiple of {m} for {f.name}: try {max(m, value // m * m)}")
    if v.num_frames is not None and f.hub_id is not None and v.num_frames > 4 * f.num_frames:
        run.warn(f"validation.num_frames = {v.num_frames} is far beyond the {f.num_frames} frames {f.name} was "
                 "trained on: rendering will be slow and the video weak")
    if cfg.datasets and cfg.datasets[0].disabled:
        run.warn("datasets[0] is disabled, yet validation takes its frame size and eval samples from it: move an "
                 "enabled dataset first")


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


# ---------------------------------------------------------------- files the config names


def _prompts(run: _Run) -> None:
    from trainer.prompts import fill_token, load_prompt_library

    v = run.cfg.validation
    if v.prompt:
        fill_token(v.prompt, v.instance_prompt, "validation.prompt")
    if v.prompt_library is not None:
        for nickname, text in load_prompt_library(v.prompt_library).items():
            fill_token(text, v.instance_prompt, f"validation.prompt_library {nickname!r}")


def _webhook(run: _Run) -> None:
    path = run.cfg.tracking.webhook_config
    if path is None:
        return
    from trainer.webhooks import load_webhook_config

    try:
        load_webhook_config(path)
    except (ValueError, TypeError) as err:  # a value of the wrong type, e.g. "timeout_s": "ten"
        run.error(f"tracking.webhook_config ({path}): a value has the wrong type ({err}): timeout_s is a number of "
                  "seconds, e.g. 10")


def _hub_repo(run: _Run) -> None:
    repo = run.cfg.hub.hub_model_id
    problem = _hub_id_problem(repo) if repo else None
    if problem:
        run.error(f"hub.hub_model_id: {repo!r} is not a valid Hub repo id ({problem}): use letters, digits, "
                  '"-", "_" and "." as in "your-user/your-lora"')


def _lycoris(run: _Run) -> None:
    lora = run.cfg.lora
    if lora.lora_type != "lycoris" or lora.lycoris_config is None:
        return
    data = read_json_object(lora.lycoris_config, "lora.lycoris_config", "lycoris.create_lycoris arguments")
    if "algo" not in data:
        raise UserError(f'lora.lycoris_config: {lora.lycoris_config} needs at least {{"algo": "lokr" | "loha" | "locon"}}')
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


def _crepa(run: _Run) -> None:
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


def _model_paths(run: _Run) -> None:
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


def _transformer_matches_flavour(run: _Run) -> None:
    """A local transformer (config.json on disk) must have the flavour's input channels, or step 1 fails."""
    import json

    from trainer.wan_layout import transformer_config_file

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


def _dataset_paths(run: _Run) -> None:
    from trainer.captions import metadata_path

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
        out = run.cfg.train.output_dir.resolve()
        if ds.path.resolve() in (out, *out.parents):
            run.warn(f"train.output_dir {out} is inside {where}.path: its validation videos would be scanned as "
                     "training clips next time; put the run folder elsewhere")


# ---------------------------------------------------------------- names the model must have


def _target_modules(run: _Run) -> None:
    lora = run.cfg.lora
    layout = module_layout(run.flavour, min(run.blocks, 1))
    paths = [p.removeprefix("blocks.0.").split(".") for p, k in layout.items() if k in ADAPTABLE]
    suffixes = {".".join(p[i:]) for p in paths for i in range(len(p))}  # "to_q", "attn1.to_q", ... (what peft matches)
    linears = sorted(x for x in suffixes if not x.isdigit())
    for target in lora.target_modules:
        found = matching_modules(layout, target)
        if not found:
            close = difflib.get_close_matches(target, linears, n=1)
            fix = f'did you mean "{close[0]}"?' if close else 'names are diffusers ones, e.g. "attn1.to_q", "ffn.net.0.proj"'
            run.error(f'lora.target_modules: "{target}" matches no module of the {run.flavour.name} transformer: {fix}')
            continue
        other = sorted({k for k in found.values() if k not in ADAPTABLE})
        if other:
            inside = sorted(p.removeprefix("blocks.0.") for p, k in layout.items()
                            if k in ADAPTABLE and any(p.startswith(f + ".") for f in found))
            fix = f'name its linear layers instead, e.g. "{inside[0]}"' if inside else "remove it"
            run.error(f'lora.target_modules: "{target}" selects {", ".join(other)} modules, which take no LoRA '
                      f"(only linear and conv layers do): {fix}")


def _block_indices(run: _Run) -> None:
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


def attention_backend_names() -> list[str] | None:
    """diffusers' attention backend names, read from its source without importing it (None: diffusers is absent)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0]) / "models" / "attention_dispatch.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "AttentionBackendName":
            return [s.value.value for s in node.body
                    if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)]
    return None


def _attention_backend(run: _Run) -> None:
    name = run.cfg.memory.attention_backend
    names = attention_backend_names()
    if name == "auto" or names is None or name in names:
        return
    close = difflib.get_close_matches(name, names, n=1)
    fix = f'did you mean "{close[0]}"?' if close else 'use "auto" or one of: ' + ", ".join(names)
    run.error(f'memory.attention_backend: unknown backend "{name}": {fix}')


def _experts(run: _Run) -> None:
    if run.cfg.model.train_both_experts and run.num_processes > 1:
        run.error(f"model.train_both_experts runs on one GPU, not {run.num_processes}: train each expert as its own "
                  "multi-GPU run, or use one GPU")


def adapter_save_problems(cfg: WanforgeConfig, modules: list[str]) -> list[str]:
    """HOOK: can an adapter on these modules (full diffusers paths) be saved as lora.save_format says?

    One call from preflight; the lead wires it to the LoRA-file helper's check in trainer.export. Until then it asks
    trainer.export's own name mapping, which is what saving the interchange file uses."""
    if cfg.lora.save_format != "comfyui" and cfg.lora.lora_type != "lycoris":
        return []
    from trainer.export import _to_original

    problems = []
    for module in modules:
        try:
            _to_original(module)
        except UserError as err:
            problems.append(f"lora.target_modules: {err}")
    return problems


def _adapter_saveable(run: _Run) -> None:
    if importlib.util.find_spec("torch") is None:
        return  # trainer.export needs torch; the launcher's own environment may not have it
    layout = module_layout(run.flavour, min(run.blocks, 1))
    adapted = sorted({p for t in run.cfg.lora.target_modules for p, k in matching_modules(layout, t).items()
                      if k in ADAPTABLE})
    for line in adapter_save_problems(run.cfg, adapted):
        run.error(line)


# ---------------------------------------------------------------- the run folder


def _output_dir(run: _Run) -> None:
    out = run.cfg.train.output_dir
    if out.is_file():
        run.error(f"train.output_dir: {out} is a file: give a folder for the run (it is created if missing)")


def _resume(run: _Run) -> None:
    from trainer.rundir import RunDir

    folder = RunDir(run.cfg.train.output_dir)
    if run.resume is not None:
        folder.resolve_resume(run.resume)
    elif folder.complete_checkpoints():
        run.error(f"train.output_dir: {folder.root} already has checkpoints: pass --resume latest to continue that "
                  "run, or set train.output_dir to a new folder")


# ---------------------------------------------------------------- this machine


def _writable(path: Path) -> bool:
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


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


def _environment(run: _Run) -> None:
    cfg = run.cfg
    if not _writable(cfg.train.output_dir):
        run.error(f"train.output_dir: {cfg.train.output_dir} is not writable here: choose a folder you can write")
    for i, ds in enumerate(cfg.datasets):
        cache = ds.cache_dir if ds.cache_dir is not None else ds.path / ".wanforge_cache"
        if not ds.disabled and ds.path.is_dir() and not _writable(cache):
            run.error(f"datasets[{i}].cache_dir: {cache} is not writable here (a read-only dataset?): set "
                      f"datasets[{i}].cache_dir to a writable folder")
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
        from trainer.wan_layout import transformer_config_file

        if transformer_config_file(cfg.model, run.flavour) is None:
            run.error(f"model: {run.flavour.hub_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                      "download it once online, or set model.pretrained_model_name_or_path to a local copy")
    _attention_requirements(run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fp8_device(run: _Run) -> None:
    import torch

    if not torch.cuda.is_available():
        return  # CPU runs fp8 slowly (tests); fp8.check_float8_device says the same
    from trainer.fp8 import check_float8_device

    check_float8_device(torch.device("cuda"))


def _wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _hub_token(run: _Run) -> None:
    try:
        from huggingface_hub import get_token
    except ImportError:
        run.error("hub.push_to_hub needs huggingface_hub: pip install huggingface_hub")
        return
    if get_token() is None:
        run.error("hub.push_to_hub: no Hugging Face token found: set HF_TOKEN in the environment (a write token; "
                  "on SkyPilot pass --secret HF_TOKEN, in Colab add an HF_TOKEN secret)")


def _attention_requirements(run: _Run) -> None:
    """The packages a named backend needs, as diffusers itself checks them (auto and the torch ones need none)."""
    name = run.cfg.memory.attention_backend
    if name == "auto" or name.startswith("_native") or name == "native" or name not in (attention_backend_names() or []):
        return
    from trainer.attention import FLASH_4, flash_attn_4_installed

    if name == FLASH_4 and flash_attn_4_installed():
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as err:
        run.error(f'memory.attention_backend = "{name}" is not usable here ({err}): use "auto"')


# ---------------------------------------------------------------- the datasets


def _scan(run: _Run) -> None:
    from trainer.discovery import check_datasets

    report, problems = check_datasets(run.cfg, run.num_processes)
    run.report.buckets = report
    for line in problems:
        run.error(line)
