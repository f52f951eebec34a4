"""[train], [optim], [flow], [ema], [checkpoint], [tread], [crepa], [scheduled_sampling]: how the loop trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.section import SEED_MAX, Section, not_empty


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
        return not_empty(v, 'the run folder, e.g. output_dir = "runs/my-lora"')

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


class CheckpointConfig(Section):
    every_n_steps: int = Field(250, ge=1, description="Save a resumable checkpoint every N steps.")
    total_limit: int | None = Field(3, ge=1, description="Keep only the newest N checkpoints (none: keep all).")


class EmaConfig(Section):
    use_ema: bool = Field(False, description="Keep an exponential moving average of the LoRA weights.")
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per update (0.999: about the last 1000 updates).")
    update_interval: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    validation: Literal["none", "ema_only", "comparison"] = Field(
        "comparison", description="Validation videos with the live weights (none), the EMA weights (ema_only), or both."
    )


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
