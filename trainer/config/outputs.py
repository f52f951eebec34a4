"""[validation], [tracking] and [hub]: what a run renders, where it reports, and where its LoRA goes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from trainer.config.data import DatasetConfig
from trainer.config.section import SEED_MAX, Section, not_empty
from trainer.flavours import WAN_NEGATIVE_PROMPT


HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PREFIX = "hf://"
Scheduler = Literal["unipc", "flow_match_euler"]
Expert = Literal["high", "low", "both"]
RENDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub model repo: `hf://owner/name[@revision]/path/in/repo.safetensors`."""

    repo_id: str
    filename: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}{'@' + self.revision if self.revision else ''}/{self.filename}"


def parse_hub_file(value: str) -> HubFile:
    """`hf://owner/name[@revision]/path/file.safetensors` -> HubFile; a ValueError names what is wrong."""
    example = f"{HUB_PREFIX}owner/repo/speed_lora.safetensors"
    body = value[len(HUB_PREFIX):] if value.startswith(HUB_PREFIX) else value
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f'"{value}" is not {HUB_PREFIX}owner/repo/file.safetensors (e.g. "{example}")')
    name, _, revision = parts[1].partition("@")
    repo_id, filename = f"{parts[0]}/{name}", "/".join(parts[2:])
    if not HUB_REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")) or "@" in revision:
        raise ValueError(f'"{value}": "{repo_id}" is not a Hub repo id (letters, digits, ".", "_", "-" as owner/name)')
    if ".." in parts[2:] or "." in parts[2:]:
        raise ValueError(f'"{value}": the file path inside the repo may not contain "." or ".." folders')
    if not filename.endswith(".safetensors"):
        raise ValueError(f'"{value}": adapters are read from .safetensors files only (pickled .pt / .bin files can '
                         "run code): pick the repo's .safetensors file")
    return HubFile(repo_id, filename, revision or None)


class ValidationAdapter(Section):
    """An extra LoRA stacked on the run's own for a validation render (a speed LoRA such as lightx2v / Lightning /
    CausVid, or a style LoRA). Read with diffusers' Wan LoRA loader: original Wan (ComfyUI), diffusers and kohya names."""

    path: str = Field(description='A .safetensors file, or a Hub file "hf://owner/repo[@revision]/file.safetensors".')
    strength: float = Field(1.0, ge=-10.0, le=10.0, description="Its weight (Lightning LoRAs are often used at 0.125-1).")
    expert: Expert = Field(
        "both", description='Wan 2.2 A14B: the expert it applies to, "high" (noisy steps), "low" or "both".'
    )

    @field_validator("path")
    @classmethod
    def _source(cls, v: str) -> str:
        v = not_empty(v, 'an adapter file, e.g. "speed_lora.safetensors"').strip()
        if v.startswith(HUB_PREFIX):
            parse_hub_file(v)
        return v

    @property
    def hub_file(self) -> HubFile | None:
        return parse_hub_file(self.path) if self.path.startswith(HUB_PREFIX) else None


class ValidationRender(Section):
    """One way to render every validation prompt. Unset sampling fields take [validation]'s values; with its
    `adapters` it is the speed-LoRA render (e.g. 4 steps, guidance 1) beside the full one."""

    name: str = Field(description='Its name in the video file names and labels, e.g. "full" or "speed".')
    num_inference_steps: int | None = Field(None, ge=1, description="Sampling steps (default: validation's).")
    guidance_scale: float | None = Field(None, ge=0, description="CFG (1: off, as speed LoRAs want; default: validation's).")
    guidance_scale_low: float | None = Field(
        None, ge=0, description="Wan 2.2 A14B: CFG of the low-noise expert (default: guidance_scale when set here).",
    )
    flow_shift: float | None = Field(None, gt=0, description="Scheduler flow shift (default: validation's).")
    scheduler: Scheduler | None = Field(None, description="unipc or flow_match_euler (default: validation's).")
    skip_layers: list[int] | None = Field(None, description="Skip-layer guidance blocks ([]: off; default: validation's).")
    lora_strength: float = Field(1.0, ge=-10.0, le=10.0, description="Strength of the run's own LoRA, on top.")
    adapters: list[ValidationAdapter] = Field(default_factory=list, description="Extra LoRAs stacked for this render.")

    @field_validator("name")
    @classmethod
    def _file_name(cls, v: str) -> str:
        if not RENDER_NAME.match(v):
            raise ValueError(f'"{v}" must be 1-32 lower-case letters, digits, "-" or "_" (it goes into file names), '
                             'e.g. "speed"')
        return v


class ValidationConfig(Section):
    every_n_steps: int = Field(0, ge=0, description="Render validation every N steps (0: only at the end).")
    at_end: bool = Field(True, description="Render validation after the last step.")
    prompt: str | None = Field(
        None, description="Validation prompt (default: the first training caption, unless prompt_library is set)."
    )
    prompt_library: Path | None = Field(
        None, description='JSON file {"nickname": "prompt", ...}: every prompt is rendered, named by its nickname.'
    )
    instance_prompt: str | None = Field(
        None, description="Your trigger word(s): replaces <token> in the prompts; also the model card's trigger words."
    )
    negative_prompt: str = Field(WAN_NEGATIVE_PROMPT, description="Negative prompt (default: the official Wan one).")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance (default: the flavour's).")
    guidance_scale_low: float | None = Field(
        None, ge=0, description="Wan 2.2 A14B: guidance of the low-noise expert (default: the flavour's)."
    )
    num_inference_steps: int = Field(40, ge=1, description="Sampling steps (40 is the common Wan setting).")
    scheduler: Scheduler = Field(
        "unipc", description="unipc: what the official Wan inference uses; flow_match_euler: the plain flow-matching sampler."
    )
    flow_shift: float | None = Field(
        None, gt=0, description="Scheduler flow shift (default: the flavour's; 5.0 at 480p, 7-12 at 720p)."
    )
    num_frames: int | None = Field(None, description="Frames to render, 4k+1 (default: the first dataset's).")
    width: int | None = Field(None, description="Width to render, a multiple of 16 (default: the first dataset's).")
    height: int | None = Field(None, description="Height to render, a multiple of 16 (default: the first dataset's).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of the validation noise (the same every validation, so videos compare).")
    skip_layers: list[int] = Field(
        default_factory=list,
        description="Skip-layer guidance: transformer blocks skipped in an extra guidance pass (empty: off; 9 is a common pick for Wan 1.3B).",
    )
    skip_layer_start: float = Field(
        0.1, ge=0.0, le=1.0, description="Skip-layer guidance starts at this fraction of the sampling steps (0: the first, noisiest)."
    )
    skip_layer_stop: float = Field(
        0.9, ge=0.0, le=1.0, description="Skip-layer guidance stops at this fraction of the sampling steps (exclusive)."
    )
    skip_layer_scale: float = Field(3.0, ge=0.0, description="Strength of skip-layer guidance.")
    control_video: Path | None = Field(
        None, description="VACE: the control clip validation renders from (default: the control clip of the first "
        "dataset's last clip, which eval_holdout keeps out of training); a video, or an image for one frame.",
    )
    control_mask: Path | None = Field(
        None, description="VACE: the mask for control_video (a video, or one image for every frame; white = generate). "
        "Default: the held-out clip's mask when the default control is used, else none.",
    )
    reference_images: list[str] = Field(
        default_factory=list, description="VACE: reference images for validation (default: the held-out clip's, when "
        "the default control is used).",
    )
    renders: list[ValidationRender] = Field(
        default_factory=list,
        description="[[validation.renders]]: render every prompt once per entry (e.g. full steps, and a speed LoRA at "
                    "4 steps); empty: one render with the settings above.",
    )
    eval_every_n_steps: int = Field(
        250, ge=0, description="Log the fixed-noise eval loss every N steps and at the end (0: off); comparable across steps and runs."
    )
    eval_samples: int = Field(4, ge=1, description="How many fixed samples the eval loss uses (the last clips of the first dataset).")
    eval_holdout: bool = Field(
        False, description="Keep the eval samples out of training, so the eval loss is a held-out loss."
    )
    eval_buckets: int = Field(5, ge=1, le=50, description="Noise-level buckets the eval loss is reported for (one fixed level each).")
    eval_seed: int = Field(1234, ge=0, le=SEED_MAX, description="Seed of the eval noise.")

    @field_validator("instance_prompt", mode="before")
    @classmethod
    def _trigger_given(cls, v: Any, info: ValidationInfo) -> Any:
        prompt = info.data.get("prompt") or ""
        if isinstance(v, str) and not v.strip() and "<token>" in prompt:
            raise ValueError('is empty, and validation.prompt uses <token>, which it stands for: give the trigger '
                             'word, e.g. instance_prompt = "sks"')
        return v

    @field_validator("num_frames")
    @classmethod
    def _frames_four_k_plus_one(cls, v: int | None) -> int | None:
        return DatasetConfig._four_k_plus_one(v)

    @field_validator("width", "height")
    @classmethod
    def _size_multiple_of_16(cls, v: int | None) -> int | None:
        return DatasetConfig._multiple_of_16(v)

    @model_validator(mode="after")
    def _skip_window(self) -> ValidationConfig:
        if self.skip_layers and self.skip_layer_start >= self.skip_layer_stop:
            raise ValueError("skip_layer_start must be below skip_layer_stop (fractions of the sampling steps)")
        if any(i < 0 for i in self.skip_layers) or any(i < 0 for r in self.renders for i in r.skip_layers or []):
            raise ValueError("skip_layers are block indices, 0 or more")
        names = [r.name for r in self.renders]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f'renders: the name "{twice[0]}" is used twice: give every render its own name')
        return self


class TrackingConfig(Section):
    report_to: Literal["none", "wandb", "tensorboard"] = Field("none", description="Tracker besides metrics.jsonl.")
    project: str = Field("wanforge", description="Tracker project name.")
    run_name: str | None = Field(None, description="Tracker run name (default: the run folder's name).")
    entity: str | None = Field(None, description="W&B entity (team or user; default: your W&B default).")
    webhook_config: Path | None = Field(
        None, description='JSON file: {"url": ..., "format": "discord"|"raw", "levels": [...]}: progress, videos, errors.'
    )


class HubConfig(Section):
    push_to_hub: bool = Field(False, description="Upload the final LoRA, a model card and a preview to the Hugging Face Hub.")
    hub_model_id: str | None = Field(
        None, description='Hub repo to upload to, "user/name" or a bare "name" in the token owner\'s account (created if missing).'
    )
    push_checkpoints_to_hub: bool = Field(False, description="Also upload each checkpoint as it is saved (for resuming elsewhere).")
    private: bool = Field(True, description="Create the repo as private.")
    trigger_words: list[str] = Field(
        default_factory=list, description="Trigger words for the model card (default: validation.instance_prompt)."
    )

    @field_validator("hub_model_id", mode="before")
    @classmethod
    def _repo_given(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str) and not v.strip() and (info.data.get("push_to_hub") or info.data.get("push_checkpoints_to_hub")):
            raise ValueError('is empty, and uploading needs it: hub_model_id = "your-user/your-lora"')
        return v

    @model_validator(mode="after")
    def _needs_repo(self) -> HubConfig:
        if (self.push_to_hub or self.push_checkpoints_to_hub) and not self.hub_model_id:
            raise ValueError('uploading needs hub_model_id = "your-user/your-lora"')
        if self.hub_model_id is not None and (not HUB_REPO_ID.match(self.hub_model_id) or ".." in self.hub_model_id
                                              or self.hub_model_id.endswith((".git", "."))):
            raise ValueError('hub_model_id must be "name" (in your account) or "user/name": letters, digits, ".", "_" '
                             'and "-"')
        return self
