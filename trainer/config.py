"""The one config schema (pydantic v2): TOML files, `--set` overrides, the notebook form and the importers all use it.

Defaults are the values that give good Wan results; each field says what it does beside it.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import UserError
from trainer.flavours import DEFAULT_FLAVOUR, FLAVOURS, WAN_NEGATIVE_PROMPT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_TARGET_MODULES = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _none_word_is_null(cls, data: Any) -> Any:
        """TOML has no null: `key = "none"` turns an optional setting off (fields that allow None only)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is not None and isinstance(value, str) and value.lower() == "none" and _allows_none(field.annotation):
                out[name] = None
        return out


def _allows_none(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


class ModelConfig(Section):
    flavour: str = Field(DEFAULT_FLAVOUR, description="Which Wan model to train (see `wanforge check` for the list).")
    pretrained_model_name_or_path: str | None = Field(
        None, description="Hub id or local folder in the diffusers layout; default: the flavour's official repo."
    )
    pretrained_transformer_model_name_or_path: str | None = Field(
        None, description="A finetuned transformer: Hub id, local folder, or one .safetensors file."
    )
    pretrained_transformer_subfolder: str | None = Field(
        "transformer", description='Subfolder of the transformer override; "none" for the folder itself.'
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    base_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the frozen base weights on a GPU (always float32 on CPU)."
    )

    @field_validator("flavour")
    @classmethod
    def _known_flavour(cls, v: str) -> str:
        if v not in FLAVOURS:
            hint = difflib.get_close_matches(v, FLAVOURS, n=1)
            fix = f'did you mean "{hint[0]}"?' if hint else "choose one of: " + ", ".join(FLAVOURS)
            raise ValueError(f'unknown flavour "{v}": {fix}')
        return v


class DatasetConfig(Section):
    path: Path = Field(description="Folder of video clips with same-stem .txt captions.")
    num_frames: int | None = Field(None, description="Frames per sample, 4k+1 (default: the flavour's, 81 for Wan 2.1).")
    width: int | None = Field(None, description="Sample width in pixels, a multiple of 16 (default: the flavour's).")
    height: int | None = Field(None, description="Sample height in pixels, a multiple of 16 (default: the flavour's).")
    caption_extension: str = Field(".txt", description="Caption files sit beside each clip with this extension.")
    repeats: int = Field(1, ge=1, description="How many times each clip is seen per epoch.")
    cache_dir: Path | None = Field(None, description="Where latents and text embeddings are cached (default: <path>/.wanforge_cache).")

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int | None) -> int | None:
        if v is not None and (v < 1 or (v - 1) % 4 != 0):
            lower = max(1, (v - 1) // 4 * 4 + 1)
            raise ValueError(f"must be 4k+1 (the Wan VAE compresses 4 frames into one): try {lower} or {lower + 4}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, v: int | None) -> int | None:
        if v is not None and (v <= 0 or v % 16 != 0):
            lower = max(16, v // 16 * 16)
            raise ValueError(f"must be a positive multiple of 16 (VAE 8x and patch 2x): try {lower} or {lower + 16}")
        return v


class LoraConfig(Section):
    rank: int = Field(32, ge=1, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: equal to rank, scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="diffusers module names to adapt in every block (self/cross attention and the FFN by default).",
    )
    save_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the saved LoRA weights.")
    save_format: Literal["comfyui", "diffusers"] = Field(
        "comfyui", description="comfyui: the interchange format ComfyUI and diffusers both load; diffusers: diffusers keys."
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class TrainConfig(Section):
    output_dir: Path = Field(Path("runs/wanforge"), description="The run folder: checkpoints, lora/, validation/, metrics.")
    max_train_steps: int = Field(2000, ge=1, description="Optimizer steps to train.")
    train_batch_size: int = Field(1, ge=1, description="Samples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, fp32 on CPU."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (none to disable).")
    max_grad_value: float | None = Field(None, gt=0, description="Clip each gradient to +-this value instead of by norm.")
    seed: int = Field(42, description="Seed for LoRA init, data order, noise and timesteps.")
    dataloader_num_workers: int = Field(0, ge=0, description="Workers loading cached tensors.")
    text_max_length: int = Field(512, ge=1, description="Text embeddings are zero-padded to this length, as at inference.")
    log_every_n_steps: int = Field(1, ge=1, description="Steps between metrics.jsonl records.")

    @model_validator(mode="after")
    def _one_clipping(self) -> TrainConfig:
        if self.max_grad_norm is not None and self.max_grad_value is not None:
            raise ValueError("set either max_grad_norm or max_grad_value, not both (set the other to none)")
        return self


class OptimConfig(Section):
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes and a GPU.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant_with_warmup", description="A diffusers LR schedule.")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")


class FlowConfig(Section):
    timestep_sampling: Literal["logit_normal", "uniform", "shift"] = Field(
        "logit_normal", description="How the noise level s in (0,1) is drawn each step."
    )
    logit_mean: float = Field(0.0, description="Mean of the logit-normal distribution.")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit-normal distribution.")
    shift: float = Field(3.0, gt=0, description="With timestep_sampling=shift: s = shift*u / (1 + (shift-1)*u), u uniform.")


class ValidationConfig(Section):
    every_n_steps: int = Field(0, ge=0, description="Render validation every N steps (0: only at the end).")
    at_end: bool = Field(True, description="Render validation after the last step.")
    prompt: str | None = Field(None, description="Validation prompt (default: the first training caption).")
    negative_prompt: str = Field(WAN_NEGATIVE_PROMPT, description="Negative prompt (default: the official Wan one).")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance (default: the flavour's).")
    num_inference_steps: int = Field(40, ge=1, description="Sampling steps (UniPC).")
    flow_shift: float | None = Field(None, gt=0, description="UniPC flow shift (default: the flavour's; 5.0 at 480p).")
    num_frames: int | None = Field(None, description="Frames to render (default: the first dataset's).")
    width: int | None = Field(None, description="Width to render (default: the first dataset's).")
    height: int | None = Field(None, description="Height to render (default: the first dataset's).")
    seed: int = Field(42, description="Seed of the validation noise.")


class MemoryConfig(Section):
    gradient_checkpointing: bool = Field(True, description="Recompute block activations in backward (less memory).")


class CheckpointConfig(Section):
    every_n_steps: int = Field(250, ge=1, description="Save a resumable checkpoint every N steps.")
    total_limit: int | None = Field(3, ge=1, description="Keep only the newest N checkpoints (none: keep all).")


class TrackingConfig(Section):
    report_to: Literal["none", "wandb", "tensorboard"] = Field("none", description="Tracker besides metrics.jsonl.")
    project: str = Field("wanforge", description="Tracker project name.")
    run_name: str | None = Field(None, description="Tracker run name (default: the run folder's name).")


class WanforgeConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    datasets: list[DatasetConfig] = Field(default_factory=list, description="One or more [[datasets]] tables.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _needs_data(self) -> WanforgeConfig:
        if not self.datasets:
            raise ValueError('no dataset: add a [[datasets]] table with path = "folder/of/clips"')
        return self

    def dataset_shape(self, index: int = 0) -> tuple[int, int, int]:
        """(num_frames, height, width) of a dataset, with the flavour's defaults filled in."""
        f = FLAVOURS[self.model.flavour]
        d = self.datasets[index]
        return (d.num_frames or f.num_frames, d.height or f.height, d.width or f.width)


# ---------------------------------------------------------------- loading, overrides, messages


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section a validation error points into (for did-you-mean)."""
    model: type[BaseModel] = WanforgeConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)


def _section_holding(key: str) -> tuple[str, str] | None:
    """The section that has (a close match of) a key, for keys put in the wrong section."""
    for name, field in WanforgeConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            close = difflib.get_close_matches(key, list(ann.model_fields), n=1, cutoff=0.8)
            if close:
                return name, close[0]
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "config"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc), n=1)
            elsewhere = _section_holding(str(loc[-1])) if len(loc) == 2 else None
            if close:
                fix = f'did you mean "{close[0]}"?'
            elif elsewhere:
                fix = f"it belongs in [{elsewhere[0]}] as {elsewhere[1]}"
            else:
                fix = "remove it (the fields of each section are listed in trainer/config.py)"
            lines.append(f"{source}: unknown key {where}: {fix}")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: {where}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"{source}: {where}: required field is missing")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """A `--set` value as TOML would read it (numbers, booleans, lists, quoted strings); bare words stay strings."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=v` (or `datasets.0.path=v`) to raw config data, in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f'--set "{assignment}": expected section.key=value, for example --set train.max_train_steps=500')
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f'--set "{assignment}": "{part}" is not an index of {".".join(parts[:i])} (0..{len(node) - 1})')
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        raise UserError(f'--set "{assignment}": name a field inside the list item, for example datasets.0.path=...')
    node[last] = parse_value(value.strip())


def config_from_dict(data: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> WanforgeConfig:
    try:
        cfg = WanforgeConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_errors(err, source)) from None
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: WanforgeConfig, base_dir: Path) -> None:
    """Relative paths in a file are relative to that file, so a config works from any working directory."""
    for d in cfg.datasets:
        if not d.path.is_absolute():
            d.path = (base_dir / d.path).resolve()
        if d.cache_dir is not None and not d.cache_dir.is_absolute():
            d.cache_dir = (base_dir / d.cache_dir).resolve()
    if not cfg.train.output_dir.is_absolute():
        cfg.train.output_dir = (base_dir / cfg.train.output_dir).resolve()
    for name in ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path"):
        value = getattr(cfg.model, name)
        if value and (value.startswith(".") or (base_dir / value).exists()):
            setattr(cfg.model, name, str((base_dir / value).resolve()))


def load_config(path: str | Path, overrides: list[str] | None = None) -> WanforgeConfig:
    """Read a TOML config, apply `--set` overrides, validate. Every problem is a UserError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file (write one, or start from `wanforge demo --out DIR`)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data, source=str(path), base_dir=path.parent.resolve())


def _absent_to_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _absent_to_none(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_absent_to_none(v) for v in data]
    return "none" if data is None else data  # read back as None by Section._none_word_is_null


def to_toml_dict(cfg: WanforgeConfig) -> dict[str, Any]:
    """Plain data for TOML: paths as strings, None written as "none" (TOML has no null) so it reads back the same."""
    return _absent_to_none(cfg.model_dump(mode="json"))


def save_config(cfg: WanforgeConfig, path: str | Path) -> None:
    from trainer.fileio import atomic_write_text

    atomic_write_text(Path(path), tomli_w.dumps(to_toml_dict(cfg)))
