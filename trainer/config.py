"""The one config schema (pydantic v2): TOML files, `--set` overrides, the notebook form and the importers all use it.

Defaults are the values that give good Wan results; each field says what it does beside it.
"""

from __future__ import annotations

import difflib
import logging
import re
import os
import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import UserError
from trainer.flavours import ALIASES, DEFAULT_FLAVOUR, FLAVOURS, WAN_NEGATIVE_PROMPT, resolve_flavour_name

_log = logging.getLogger(__name__)

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


def four_k_plus_one(frames: int) -> int:
    """The frame count the Wan VAE takes (4k+1) nearest to `frames`, the smaller one on a tie (84 -> 85, 83 -> 81).
    The one rounding rule of the schema and the SimpleTuner importer."""
    return max(1, frames // 4 * 4 + 1)


HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
# str fields that name a file or folder when they are not a Hub id (a Hub id never starts with "~")
PATH_STRINGS = ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
                "pretrained_vae_model_name_or_path", "encoder_path")


class Section(BaseModel):
    # nan / inf are refused everywhere: no library underneath trains on them
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _none_word_is_null(cls, data: Any) -> Any:
        """TOML has no null: `key = "none"` turns an optional setting off (fields that allow None only). A path
        starting with `~` is the user's home, as in a shell."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is None or not isinstance(value, str):
                continue
            if value.lower() == "none" and _allows_none(field.annotation):
                out[name] = None
            elif value.startswith("~") and (name in PATH_STRINGS or _is_path(field.annotation)):
                out[name] = os.path.expanduser(value)
        return out


def _allows_none(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


def _not_empty(value: Any, what: str) -> Any:
    """An empty path would silently mean the config's own folder."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"is empty: give {what}")
    return value


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in getattr(annotation, "__args__", ())


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
    pretrained_vae_model_name_or_path: str | None = Field(
        None, description="A separate VAE: Hub id, folder (with or without a vae/ subfolder) or one .safetensors/.pth file."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    base_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the frozen base weights on a GPU (always float32 on CPU)."
    )
    train_both_experts: bool = Field(
        False,
        description="Wan 2.2 A14B: train the high- and low-noise experts in one run (each on its side of the boundary, "
        "the idle expert kept in CPU RAM); writes lora/high_noise/ and lora/low_noise/. One GPU per run.",
    )
    expert_switch_every_n_steps: int = Field(
        50, ge=1, description="With train_both_experts: optimizer steps on one expert before switching to the other."
    )
    wan_validation_load_other_stage: bool = Field(
        True,
        description="Wan 2.2 A14B: validation loads the other expert for its timesteps, so videos are full renders "
        "(false: only the trained expert renders every step, which looks wrong but needs no second model).",
    )
    wan_force_2_1_time_embedding: bool = Field(
        False,
        description="TI2V-5B: feed one timestep per sample (Wan 2.1 style) instead of per-token timesteps, for "
        "finetunes whose time embedding was trained that way.",
    )

    @field_validator("flavour")
    @classmethod
    def _known_flavour(cls, v: str) -> str:
        resolved = resolve_flavour_name(v)  # SimpleTuner's model_flavour names are aliases
        if resolved is None:
            hint = difflib.get_close_matches(v, [*FLAVOURS, *ALIASES], n=1)
            fix = f'did you mean "{hint[0]}"?' if hint else "choose one of: " + ", ".join(FLAVOURS)
            raise ValueError(f'unknown flavour "{v}": {fix}')
        return resolved

    @model_validator(mode="after")
    def _experts_need_a_2_2_flavour(self) -> ModelConfig:
        if self.train_both_experts and not FLAVOURS[self.flavour].is_expert:
            raise ValueError(
                f"train_both_experts needs a Wan 2.2 A14B flavour (t2v-14b-2.2-high/-low, i2v-14b-2.2-high/-low), "
                f"not {self.flavour}"
            )
        return self


class DatasetConfig(Section):
    """One [[datasets]] table. Names follow SimpleTuner's multidatabackend.json where they are clear."""

    # ---- where the samples come from
    id: str | None = Field(None, description="Name in reports and logs (default: the folder's name).")
    path: Path = Field(
        description="Folder of videos (mp4/mov/webm/mkv/avi) and images (png/jpg/webp, one-frame samples); "
        "with hf_repo: the folder the Hub dataset is downloaded into."
    )
    hf_repo: str | None = Field(
        None, description='Hugging Face dataset repo id ("user/name"), downloaded into `path` with huggingface_hub.'
    )
    hf_revision: str | None = Field(None, description="Branch, tag or commit of hf_repo (default: main).")
    disabled: bool = Field(False, description="Leave this dataset out (its caches are kept).")
    repeats: int = Field(
        1, ge=1, description="How many times each sample is seen per epoch (SimpleTuner's repeats=N is N+1 here)."
    )
    sampling_weight: float = Field(
        1.0, gt=0, description="Relative chance that a batch comes from this dataset (SimpleTuner's probability)."
    )
    # ---- captions
    caption_strategy: Literal["textfile", "metadata", "filename", "instanceprompt"] = Field(
        "textfile",
        description="textfile: same-stem caption file; metadata: metadata.jsonl/.csv rows (file_name + caption "
        "column); filename: the file name with _ and - as spaces; instanceprompt: instance_prompt for every sample.",
    )
    caption_extension: str = Field(".txt", description="textfile: caption files sit beside each sample with this extension.")
    metadata_file: str | None = Field(
        None, description="metadata: file inside the folder (default: metadata.jsonl, else metadata.csv)."
    )
    caption_column: str = Field("caption", description="metadata: the column holding the caption (file column: file_name).")
    instance_prompt: str | None = Field(
        None, description="instanceprompt: the caption of every sample; other strategies: used where a caption is missing."
    )
    caption_dropout_probability: float = Field(
        0.0, ge=0.0, lt=1.0, description="Chance a sample trains with the empty caption (0.05-0.1 helps guidance)."
    )
    # ---- frame size and buckets
    resolution: float | None = Field(
        None,
        description="Target size in resolution_type units (default: the flavour's area, 832x480 for Wan 2.1 480p). "
        "Ignored when width and height are both set.",
    )
    resolution_type: Literal["pixel_area", "pixel", "area"] = Field(
        "pixel_area",
        description="pixel_area: resolution is the side of a square of the target area (632 ~ 832x480); "
        "pixel: the shorter edge in pixels; area: megapixels.",
    )
    width: int | None = Field(None, description="With height: one fixed sample size (multiple of 16) instead of buckets.")
    height: int | None = Field(None, description="With width: one fixed sample size (multiple of 16) instead of buckets.")
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = Field(
        "aspect_ratio",
        description="aspect_ratio: sizes snap to common aspect ratios (fewer, fuller buckets); resolution_frames: "
        "each sample keeps its own aspect rounded to 16 px, buckets named WxH@F (less cropping, more buckets).",
    )
    crop: bool = Field(True, description="Crop to the bucket's aspect (false: resize to it, a slight stretch).")
    crop_style: Literal["center", "random"] = Field(
        "center", description="Where the crop window sits: centre, or a random place fixed per sample (cached)."
    )
    crop_aspect: Literal["preserve", "square"] = Field(
        "preserve", description="preserve: the bucket nearest the sample's aspect; square: every sample cropped square."
    )
    minimum_image_size: float | None = Field(
        None, description="Skip samples smaller than this (resolution_type units) instead of upscaling them."
    )
    maximum_image_size: float | None = Field(
        None, description="Samples larger than this (resolution_type units) are first downsampled to target_downsample_size."
    )
    target_downsample_size: float | None = Field(
        None, description="With maximum_image_size: the size large samples are scaled to before the bucket-sized crop "
        "(larger than resolution: crops show detail)."
    )
    # ---- frames
    num_frames: int | None = Field(
        None, description="Frames per sample, 4k+1; other values are rounded (default: the flavour's, 81 for Wan 2.1)."
    )
    min_frames: int | None = Field(
        None, ge=1, description="Clips shorter than this (frames at the model's fps) are skipped; clips between "
        "min_frames and num_frames train at their own length (a frame bucket). Default: num_frames.",
    )
    max_frames: int | None = Field(None, ge=1, description="Skip clips longer than this many frames at the model's fps.")
    frame_interval: int = Field(
        4, ge=4, description="Frame buckets step: shorter clips use 1 + a multiple of this many frames (multiple of 4)."
    )
    target_fps: float | None = Field(
        None, gt=0, description="Clips are resampled to this frame rate by timestamps (default: the model's, 16 for Wan 2.1)."
    )
    window_start: Literal["beginning", "random"] = Field(
        "beginning", description="Where the frames of a longer clip start: at 0 s, or a random time fixed per clip (cached)."
    )
    # ---- problems and caches
    delete_problematic: bool = Field(
        False, description="Move unusable files (with their captions) to <path>/.quarantine/ instead of only listing them."
    )
    cache_dir: Path | None = Field(None, description="Latent cache folder (default: <path>/.wanforge_cache). SimpleTuner: cache_dir_vae.")
    text_cache_dir: Path | None = Field(None, description="Text-embedding cache folder (default: <cache_dir>/text).")

    @property
    def name(self) -> str:
        return self.id or self.path.name

    @field_validator("path", mode="before")
    @classmethod
    def _path_given(cls, v: Any) -> Any:
        return _not_empty(v, "the folder of clips and captions")

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int | None) -> int | None:
        if v is None:
            return v
        if v < 1:
            raise ValueError("must be 1 or more, 4k+1 (1, 5, ..., 81)")
        rounded = four_k_plus_one(v)
        if rounded != v:
            _log.warning("num_frames=%d is not 4k+1 (the Wan VAE packs 4 frames into one): using %d", v, rounded)
        return rounded

    @field_validator("frame_interval")
    @classmethod
    def _multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"must be a multiple of 4 (frame counts are 4k+1): try {v // 4 * 4 or 4} or {v // 4 * 4 + 4}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, v: int | None) -> int | None:
        if v is not None and (v <= 0 or v % 16 != 0):
            lower = max(16, v // 16 * 16)
            raise ValueError(f"must be a positive multiple of 16 (VAE 8x and patch 2x): try {lower} or {lower + 16}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DatasetConfig:
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height (one fixed size), or neither (buckets from resolution)")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError('caption_strategy "instanceprompt" needs instance_prompt = "your trigger words"')
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ValueError("maximum_image_size and target_downsample_size go together: set both or neither")
        if self.hf_repo is not None and self.hf_repo.count("/") != 1:
            raise ValueError('hf_repo must look like "user/name"')
        return self


class LoraConfig(Section):
    rank: int = Field(32, ge=1, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: equal to rank, scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="diffusers module names to adapt, each matching every module path that ends in it (default: every "
        'block\'s self/cross attention and FFN). Top-level "proj_out", "time_proj", "linear_1", "linear_2" and, on Wan 2.1 '
        'I2V, "add_k_proj" + "add_v_proj" and "ff.net.0.proj" / "ff.net.2" (image embedder) save too.',
    )
    save_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the saved LoRA weights.")
    save_format: Literal["comfyui", "diffusers"] = Field(
        "comfyui", description="comfyui: the interchange format ComfyUI and diffusers both load; diffusers: diffusers keys."
    )
    lora_type: Literal["lora", "lycoris"] = Field(
        "lora", description="lora: peft LoRA; lycoris: LoKr / LoHa / LoCon from the lycoris-lora package (needs lycoris_config)."
    )
    lycoris_config: Path | None = Field(
        None,
        description='JSON file for lora_type = "lycoris": {"algo": "lokr"|"loha"|"locon", "multiplier": 1.0, '
        '"linear_dim": 10000, "linear_alpha": 1, "factor": 16, "apply_preset": {...}} (lycoris.create_lycoris kwargs).',
    )

    @model_validator(mode="after")
    def _lycoris_needs_config(self) -> LoraConfig:
        if self.lora_type == "lycoris" and self.lycoris_config is None:
            raise ValueError('lora_type = "lycoris" needs lycoris_config = "path/to/lycoris_config.json"')
        return self

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
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for LoRA init, data order, noise and timesteps.")
    dataloader_num_workers: int = Field(0, ge=0, description="Workers loading cached tensors.")
    text_max_length: int = Field(512, ge=1, description="Text embeddings are zero-padded to this length, as at inference.")
    log_every_n_steps: int = Field(1, ge=1, description="Steps between metrics.jsonl records.")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_given(cls, v: Any) -> Any:
        return _not_empty(v, 'the run folder, e.g. "runs/my-lora"')

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
    num_inference_steps: int = Field(40, ge=1, description="Sampling steps (40 is the common Wan setting).")
    scheduler: Literal["unipc", "flow_match_euler"] = Field(
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
    eval_every_n_steps: int = Field(
        250, ge=0, description="Log the fixed-noise eval loss every N steps and at the end (0: off); comparable across steps and runs."
    )
    eval_samples: int = Field(4, ge=1, description="How many fixed samples the eval loss uses (the last clips of the first dataset).")
    eval_holdout: bool = Field(
        False, description="Keep the eval samples out of training, so the eval loss is a held-out loss."
    )
    eval_buckets: int = Field(5, ge=1, le=50, description="Noise-level buckets the eval loss is reported for (one fixed level each).")
    eval_seed: int = Field(1234, ge=0, le=SEED_MAX, description="Seed of the eval noise.")

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
        if any(i < 0 for i in self.skip_layers):
            raise ValueError("skip_layers are block indices, 0 or more")
        return self


class MemoryConfig(Section):
    preset: Literal["none", "auto", "fast", "balanced", "balanced-lean", "low", "low-int8", "low-host-ram",
                    "balanced-fp8"] = Field(
        "auto",
        description='"auto": on a GPU, the fastest measured preset that fits its memory and the free host RAM (fields '
        'you set yourself win; on CPU nothing changes). "balanced" = selective checkpointing per sub-layer + compile + '
        'activation offload (fastest measured, needs host RAM); "balanced-lean" = balanced without sub-layers (half the '
        'host RAM); "fast" = selective checkpointing + compile, no offload; '
        '"low" = balanced + chunked feed-forward; "low-int8" = offload + int8 base weights + 4096-token FF chunks; '
        '"low-host-ram" = full checkpointing + compile + int8, no offload; "balanced-fp8" = balanced with fp8 base '
        'weights (fastest on Ada / Hopper, slightly different numbers: never picked by "auto"). "none": exactly the '
        'fields below. Numbers: bench/RESULTS.md.',
    )
    gradient_checkpointing: Literal["none", "full", "selective"] = Field(
        "selective",
        description='Recompute block activations in backward. "selective" keeps self-attention outputs and recomputes '
        'the rest (~10% extra compute, ~100 MB per block at 1.3B 832x480x81); "full" recomputes everything (least '
        'memory, ~35% extra compute); "none" keeps all activations (fastest, tens of GB). true/false mean full/none.',
    )
    checkpointed_blocks: int | None = Field(
        None, ge=0, description="Checkpoint only the first N transformer blocks (the rest keep activations); none: all."
    )
    attention_backend: str = Field(
        "auto",
        description='diffusers attention backend: "auto" (FlashAttention 4 on Hopper when wanforge[flash4] is '
        'installed, else cuDNN SDPA on NVIDIA), "flash_4_hub" (FA4: the installed package, '
        'else the kernels hub), "native", "_native_cudnn", "_native_flash", "_native_efficient", "sage", ...',
    )
    compile: bool = Field(False, description="torch.compile the repeated transformer block (regional compile).")
    feed_forward_chunk_size: int | None = Field(
        None, ge=1, description="Run the feed-forward over this many tokens at a time (less peak memory, exact); "
        "also read from WAN_FEED_FORWARD_CHUNK_SIZE.",
    )
    activation_offload: bool = Field(
        False,
        description="Move what each checkpointed block keeps for backward (its inputs; with selective checkpointing "
        "also the attention output) to pinned CPU memory during forward, fetched back one block ahead in backward on "
        "side CUDA streams. GPU activation memory drops to about one block; costs host RAM (docs/memory-and-speed.md) "
        "and PCIe bandwidth. Needs gradient_checkpointing selective or full.",
    )
    checkpoint_sublayers: bool = Field(
        False,
        description="Checkpoint each block's self-attention, cross-attention and feed-forward separately: backward "
        "skips recomputing the two attention output projections for two more kept hidden-size tensors per block; "
        "meant with activation_offload.",
    )
    base_quantization: Literal["none", "int8", "fp8"] = Field(
        "none",
        description='Frozen base weights: "int8" (optimum-quanto weight-only, half the bf16 weight memory, a slightly slower '
        'step); "fp8" (e4m3 with per-row scales and real fp8 matmuls for the forward and the input '
        'gradient: a faster step on Ada / Hopper / Blackwell GPUs, same memory as bf16, a small relative error per '
        'matmul). NF4 / int4 are refused: 4-bit base weights ruin Wan video quality.',
    )

    shard_base: bool = Field(
        False,
        description="Shard the frozen base model over the training processes (FSDP2): each GPU holds 1/N of the "
        "weights, so a model larger than one card trains on several (N >= 2 processes; bf16 base, peft LoRA). Costs "
        "an all-gather of each block's weights per forward and backward; regional compile is not used with it.",
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _bool_checkpointing(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "full" if v else "none"
        return v

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> "MemoryConfig":
        if self.checkpoint_sublayers and self.gradient_checkpointing == "none":
            raise ValueError('checkpoint_sublayers needs gradient_checkpointing = "selective" or "full"')
        if self.activation_offload and self.gradient_checkpointing == "none":
            raise ValueError('activation_offload needs gradient_checkpointing = "selective" or "full": without '
                             "checkpointing every block's full activations (~2.8 GiB per 1.3B block at 832x480x81) "
                             "would cross PCIe each step")
        return self

    @field_validator("base_quantization", mode="before")
    @classmethod
    def _no_four_bit(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in {"nf4", "int4", "fp4", "4bit", "int4_weight_only"}:
            raise ValueError(f'"{v}" is refused for Wan (4-bit base weights ruin video quality): use "int8"')
        if isinstance(v, str) and v.lower() in {"float8", "fp8_e4m3", "fp8-torchao", "fp8-quanto"}:
            return "fp8"
        return v


class CheckpointConfig(Section):
    every_n_steps: int = Field(250, ge=1, description="Save a resumable checkpoint every N steps.")
    total_limit: int | None = Field(3, ge=1, description="Keep only the newest N checkpoints (none: keep all).")


class CacheConfig(Section):
    """How the latent and text caches are built (where they go is per dataset: cache_dir, text_cache_dir)."""

    vae_batch_size: int = Field(
        1, ge=1, description="Clips of one bucket VAE-encoded together (1 suits 81-frame clips; more helps images)."
    )
    decode_workers: int = Field(2, ge=0, description="Threads decoding clips ahead of the VAE (0: decode inline).")
    vae_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="VAE precision for caching latents on a GPU: bfloat16 is faster, float32 a little more "
        "exact (the choice does not invalidate a cache); float32 on a CPU either way."
    )
    compress_latents: bool = Field(
        False, description="Store latents as bfloat16: half the disk and RAM (its rounding is far below the VAE's own error)."
    )


class EmaConfig(Section):
    use_ema: bool = Field(False, description="Keep an exponential moving average of the LoRA weights.")
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per update (0.999: about the last 1000 updates).")
    update_interval: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    validation: Literal["none", "ema_only", "comparison"] = Field(
        "comparison", description="Validation videos with the live weights (none), the EMA weights (ema_only), or both."
    )


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

    @model_validator(mode="after")
    def _needs_repo(self) -> HubConfig:
        if (self.push_to_hub or self.push_checkpoints_to_hub) and not self.hub_model_id:
            raise ValueError('uploading needs hub_model_id = "your-user/your-lora"')
        if self.hub_model_id is not None and (not HUB_REPO_ID.match(self.hub_model_id) or ".." in self.hub_model_id
                                              or self.hub_model_id.endswith((".git", "."))):
            raise ValueError('hub_model_id must be "name" (in your account) or "user/name": letters, digits, ".", "_" '
                             'and "-"')
        return self


class TreadRoute(Section):
    selection_ratio: float = Field(
        ge=0.0, lt=1.0,
        description="Fraction of the video tokens ROUTED AROUND these blocks, i.e. dropped from them (0.1: 10% skip "
        "the blocks, 90% go through; 0: no effect). Higher is faster and harder on quality; 0.1-0.25 keeps quality.",
    )
    start_layer_idx: int = Field(description="First routed transformer block, 0-based (negative counts from the end: -1 is the last).")
    end_layer_idx: int = Field(description="Last routed block, inclusive (negative from the end); routed tokens rejoin after it.")


class TreadConfig(Section):
    routes: list[TreadRoute] = Field(
        default_factory=list,
        description="TREAD token routing (training only, off in validation): in each route a random selection_ratio "
        "of the video tokens skips blocks start..end and is put back in place after end; text tokens are never "
        "dropped. Routes must not overlap. Empty: off. E.g. [{selection_ratio = 0.1, start_layer_idx = 2, end_layer_idx = -2}].",
    )


class CrepaConfig(Section):
    enabled: bool = Field(False, description="CREPA: align a block's hidden states to DINOv2 features of the same and neighbouring frames.")
    block_index: int = Field(8, ge=0, description="0-based transformer block whose output is aligned.")
    weight: float = Field(0.5, ge=0.0, description="Weight of the CREPA loss added to the flow loss.")
    adjacent_distance: int = Field(1, ge=0, description="Neighbouring latent frames (each side) each frame is also aligned to (0: per-frame REPA).")
    temporal_decay: float = Field(1.0, gt=0.0, description="A neighbour at distance d weighs exp(-d / temporal_decay) (the frame itself weighs 1).")
    encoder: Literal["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"] = Field(
        "dinov2_vitg14", description="DINOv2 encoder (torch hub name); dinov2_vits14 with image size 224 saves memory."
    )
    encoder_image_size: int = Field(518, ge=14, description="Frames are resized to this square size for the encoder (a multiple of 14; 518 for vitg14, 224 for vits14).")
    encoder_path: str | None = Field(
        None, description="Local encoder instead of torch hub: a clone of facebookresearch/dinov2 (hubconf.py) or a "
        "transformers Dinov2 folder (config.json + weights, e.g. a download of facebook/dinov2-giant).",
    )

    @field_validator("encoder_image_size")
    @classmethod
    def _multiple_of_14(cls, v: int) -> int:
        if v % 14:
            lower = max(14, v // 14 * 14)
            raise ValueError(f"must be a multiple of 14 (the DINOv2 patch): try {lower} or {lower + 14}")
        return v


class ScheduledSamplingConfig(Section):
    probability: float = Field(
        0.0, ge=0.0, le=1.0, description="Scheduled sampling: chance that a sample's training input comes from the "
        "model's own denoising instead of exact noising (0: off). Costs about probability x steps extra forward passes per step.",
    )
    probability_start: float = Field(0.0, ge=0.0, le=1.0, description="Probability at step 0 when ramp_steps > 0.")
    ramp_steps: int = Field(0, ge=0, description="Ramp the probability linearly from probability_start to probability over this many steps (0: no ramp).")
    steps: int = Field(4, ge=1, description="Denoising steps the model takes (no gradient) from the higher noise level down to the training one.")
    sigma_offset: float = Field(0.1, gt=0.0, le=1.0, description="How much noisier the rollout starts (noise level s + offset, capped at 1).")


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
    ema: EmaConfig = Field(default_factory=EmaConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    tread: TreadConfig = Field(default_factory=TreadConfig)
    crepa: CrepaConfig = Field(default_factory=CrepaConfig)
    scheduled_sampling: ScheduledSamplingConfig = Field(default_factory=ScheduledSamplingConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_section_names(cls, data: Any) -> Any:
        """`[rollout]` was the first name of `[scheduled_sampling]`: configs that use it still load, with a warning."""
        if isinstance(data, dict) and "rollout" in data and "scheduled_sampling" not in data:
            _log.warning("[rollout] is now called [scheduled_sampling]: rename the section (it was read as that)")
            data = {("scheduled_sampling" if k == "rollout" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _needs_data(self) -> WanforgeConfig:
        if not self.datasets:
            raise ValueError('no dataset: add a [[datasets]] table with path = "folder/of/clips"')
        step = FLAVOURS[self.model.flavour].vae_spatial * 2  # VAE downscale x patch 2: 16, or 32 for the Wan 2.2 VAE
        for i in range(len(self.datasets)):
            _, height, width = self.dataset_shape(i)
            if height % step or width % step:
                raise ValueError(
                    f"datasets[{i}]: {width}x{height} does not fit {self.model.flavour} (its VAE and patching need "
                    f"multiples of {step}): try {max(step, width // step * step)}x{max(step, height // step * step)}"
                )
        return self

    @model_validator(mode="after")
    def _fp8_needs_a_standard_lora(self) -> WanforgeConfig:
        fp8 = self.memory.base_quantization == "fp8" or self.memory.preset == "balanced-fp8"
        if fp8 and self.lora.lora_type == "lycoris":
            raise ValueError('memory: fp8 base weights (base_quantization = "fp8" or preset = "balanced-fp8") work with '
                             'lora.lora_type = "standard" only: LyCORIS adds its delta to the base weight itself, which '
                             'fp8 keeps quantized; use base_quantization = "none" or "int8" with LyCORIS')
        return self

    def dataset_shape(self, index: int = 0) -> tuple[int, int, int]:
        """(num_frames, height, width) of a dataset, with the flavour's defaults filled in."""
        f = FLAVOURS[self.model.flavour]
        d = self.datasets[index]
        return (d.num_frames or f.num_frames, d.height or f.height, d.width or f.width)


# ---------------------------------------------------------------- loading, overrides, messages


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (itself, or the items of a list of them)."""
    for a in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        inner = next((x for x in getattr(a, "__args__", ()) if isinstance(x, type) and issubclass(x, BaseModel)), None)
        if inner is not None:
            return inner
    return None


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class a location points into (list indices skipped), or None past a plain value."""
    model: type[BaseModel] | None = WanforgeConfig
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return None
        model = _submodel(field.annotation)
    return model


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section a validation error points into (for did-you-mean)."""
    model = _model_at(loc[:-1])
    return list(model.model_fields) if model is not None else []


def _section_holding(key: str) -> tuple[str, str] | None:
    """The section that has (a close match of) a key, for keys put in the wrong section."""
    for name, field in WanforgeConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            close = difflib.get_close_matches(key, list(ann.model_fields), n=1, cutoff=0.8)
            if close:
                return name, close[0]
    return None


def _default_hint(loc: tuple[Any, ...]) -> str:
    """' (default: X)' for a field whose default is a plain number: a value the schema itself accepts."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    default = getattr(field, "default", None)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return f": try the default, {default!r}"
    return ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "config"
        kind = e["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc), n=1)
            elsewhere = _section_holding(str(loc[-1])) if len(loc) == 2 else None
            if close:
                fix = f'did you mean "{close[0]}"?'
            elif elsewhere:
                fix = f"it belongs in [{elsewhere[0]}] as {elsewhere[1]}"
            else:
                fix = "remove it (the fields of each section are listed in trainer/config.py)"
            lines.append(f"{source}: unknown key {where}: {fix}")
        elif kind == "missing":
            lines.append(f"{source}: {where}: required field is missing")
        elif kind == "model_type" or kind == "model_attributes_type":
            lines.append(f"{source}: {where} is a section (a table), not a value (got {e.get('input')!r}): set the "
                         f"fields inside it, e.g. [{where}] in the file or --set {where}.FIELD=VALUE")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            if kind == "finite_number":
                msg = "must be a finite number, not nan or inf"
            fix = ""
            if kind == "literal_error":
                expected = [x.strip(" '\"") for x in str(e.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
                close = difflib.get_close_matches(str(e.get("input")), [x for x in expected if x], n=1)
                fix = f': did you mean "{close[0]}"?' if close else ""
            elif kind == "list_type" and isinstance(e.get("input"), dict):
                fix = f": write [[{where}]] with double brackets (a list of tables), or {where} = [...]"
            elif kind == "list_type" and isinstance(e.get("input"), (str, int, float)):
                fix = f": write a list, {where} = [{e.get('input')!r}]".replace("'", '"')
            elif kind in ("finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
                          "int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
                fix = _default_hint(loc)
            lines.append(f"{source}: {where}: {msg} (got {e.get('input')!r}){fix}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """A `--set` value as TOML would read it (numbers, booleans, lists, quoted strings); bare words stay strings."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _override_problem(parts: list[str], value: Any) -> str | None:
    """Why `--set a.b.c=value` names no field of the schema (None: it does)."""
    model: type[BaseModel] = WanforgeConfig
    i = 0
    while i < len(parts):
        part, where = parts[i], ".".join(parts[:i])
        field = model.model_fields.get(part)
        if field is None:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1)
            hint = f"did you mean {'.'.join([*parts[:i], close[0]])}?" if close else "its fields: " + ", ".join(model.model_fields)
            return f'{where or "the config"} has no field "{part}": {hint}'
        name, sub, last = ".".join(parts[: i + 1]), _submodel(field.annotation), i == len(parts) - 1
        if sub is None:
            return None if last else f"{name} is a value, not a section: set it directly, e.g. --set {name}=VALUE"
        if _is_list(field.annotation):
            if last:
                return None if isinstance(value, list) else \
                    f"{name} is a list of tables: set a field of one item, e.g. --set {name}.0.FIELD=VALUE"
            if not parts[i + 1].isdigit():
                return f"{name} is a list: name an item by its index, e.g. --set {name}.0.{parts[i + 1]}=VALUE"
            i += 1
            if i == len(parts) - 1:
                return None if isinstance(value, dict) else \
                    f"{name}.{parts[i]} is a table: set a field inside it, e.g. --set {name}.{parts[i]}.FIELD=VALUE"
        elif last:
            return None if isinstance(value, dict) else \
                f"{name} is a section, not a value: set a field inside it, e.g. --set {name}.FIELD=VALUE"
        model = sub
        i += 1
    return None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=v` (or `datasets.0.path=v` / `datasets[0].path=v`) to raw config data, in place. A key the schema does not have, a
    value set into a section or a field set inside a value is a UserError naming the fix."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f'--set "{assignment}": expected section.key=value, for example --set train.max_train_steps=500')
    key = re.sub(r"\[\s*(\d+)\s*\]", r".\1", key)  # datasets[0].repeats, as the error messages name it
    parts = [p.strip() for p in key.strip().split(".")]
    parsed = parse_value(value.strip())
    problem = _override_problem(parts, parsed)
    if problem:
        raise UserError(f'--set "{assignment}": {problem}')
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                have = f"indices 0..{len(node) - 1}" if node else "no items: add one in the file first"
                raise UserError(f'--set "{assignment}": "{part}" is not an index of {".".join(parts[:i])} ({have})')
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, [] if parts[i + 1].isdigit() else {})
        else:
            raise UserError(f'--set "{assignment}": {".".join(parts[:i])} holds {node!r} in the file, not a table')
    if not isinstance(node, dict):
        raise UserError(f'--set "{assignment}": {".".join(parts[:-1])} holds {node!r} in the file, not a table')
    node[parts[-1]] = parsed


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
        if d.text_cache_dir is not None and not d.text_cache_dir.is_absolute():
            d.text_cache_dir = (base_dir / d.text_cache_dir).resolve()
    for section, name in (("validation", "prompt_library"), ("tracking", "webhook_config")):
        value = getattr(getattr(cfg, section), name)
        if value is not None and not value.is_absolute():
            setattr(getattr(cfg, section), name, (base_dir / value).resolve())
    if not cfg.train.output_dir.is_absolute():
        cfg.train.output_dir = (base_dir / cfg.train.output_dir).resolve()
    if cfg.lora.lycoris_config is not None and not cfg.lora.lycoris_config.is_absolute():
        cfg.lora.lycoris_config = (base_dir / cfg.lora.lycoris_config).resolve()
    for section, name in (("model", "pretrained_model_name_or_path"), ("model", "pretrained_transformer_model_name_or_path"),
                          ("model", "pretrained_vae_model_name_or_path"), ("crepa", "encoder_path")):
        value = getattr(getattr(cfg, section), name)
        if value and (value.startswith(".") or (base_dir / value).exists()):
            setattr(getattr(cfg, section), name, str((base_dir / value).resolve()))


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML config file. A missing file, a folder, bytes that are not UTF-8 and bad TOML are each
    a one-line UserError with the fix; a UTF-8 byte-order mark (Windows editors write one) is accepted."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.glob("*.toml"))
        hint = f"e.g. {inside[0]}" if inside else "a .toml file, not the folder it is in"
        raise UserError(f"{path}: is a folder, not a config file: give the config file itself ({hint})")
    if not path.is_file():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.toml")], n=1) \
            if path.parent.is_dir() else []
        hint = f"did you mean {path.parent / near[0]}?" if near else "write one, or start from `wanforge demo --out DIR`"
        raise UserError(f"{path}: no such config file ({hint})")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: byte 0x{raw[err.start]:02x} on line {line} is not UTF-8: save the file as UTF-8 "
                        "(TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        hint = ": for a SimpleTuner config.json use `wanforge import-simpletuner`" if path.suffix.lower() == ".json" else ""
        raise UserError(f"{path}: not valid TOML: {err}{hint}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> WanforgeConfig:
    """Read a TOML config, apply `--set` overrides, validate. Every problem is a UserError naming the field."""
    path = Path(path)
    data = read_config_data(path)
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
