"""[model], [lora] and [memory]: which Wan to train, the adapter on it, and how it is held in memory."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.section import Section
from trainer.flavours import ALIASES, DEFAULT_FLAVOUR, FLAVOURS, resolve_flavour_name


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
    vace_blocks: bool = Field(
        True,
        description="VACE flavours: the target modules inside the VACE blocks (the control branch, where a control "
        "LoRA learns a new kind of control) are adapted too; false: the main blocks only (e.g. a style or subject LoRA "
        "used with VACE). Other flavours have no VACE blocks and ignore it.",
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

    @field_validator("target_modules")
    @classmethod
    def _something_to_train(cls, v: list[str]) -> list[str]:
        """An empty list would train nothing (peft refuses it mid-run); a name given twice counts once."""
        if not v:
            raise ValueError('is empty, so nothing would train: remove the key to use the default (every block\'s '
                             'attention and feed-forward), or name modules, e.g. ["attn1.to_q", "attn1.to_k"]')
        return list(dict.fromkeys(name.strip() for name in v))

    @model_validator(mode="after")
    def _lycoris_needs_config(self) -> LoraConfig:
        if self.lora_type == "lycoris" and self.lycoris_config is None:
            raise ValueError('lora_type = "lycoris" needs lycoris_config = "path/to/lycoris_config.json"')
        return self

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class MemoryConfig(Section):
    preset: Literal["none", "auto", "fast", "balanced", "balanced-lean", "low", "low-int8", "low-host-ram",
                    "low-16gb", "balanced-fp8"] = Field(
        "auto",
        description='"auto": on a GPU, the fastest measured preset that fits its memory and the free host RAM (fields '
        'you set yourself win; on CPU nothing changes). "balanced" = selective checkpointing per sub-layer + compile + '
        'activation offload (fastest measured, needs host RAM); "balanced-lean" = balanced without sub-layers (half the '
        'host RAM); "fast" = selective checkpointing + compile, no offload; '
        '"low" = balanced + chunked feed-forward; "low-int8" = offload + int8 base weights + 4096-token FF chunks; '
        '"low-host-ram" = full checkpointing + compile + int8, no offload; "low-16gb" = full checkpointing + compile + '
        'offload + int8 + 4096-token FF chunks + 30 blocks streamed from host RAM (Wan 14B on a 16 GB card; not '
        'measured yet); "balanced-fp8" = balanced with fp8 base '
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

    streamed_blocks: int | None = Field(
        None, ge=0,
        description="How many transformer blocks keep their frozen base weights in pinned host RAM (like other "
        "trainers' blocks_to_swap): each is copied to the GPU for its forward and again for its backward, the next "
        "block's copy overlapping the current block's compute. GPU memory drops by one block's weights per streamed "
        "block (14B: ~0.33 GiB int8, ~0.65 GiB bf16) plus two blocks' worth of slots; host RAM rises by as much, "
        "and each step moves about twice the streamed weights over PCIe. Only checkpointed blocks stream (spread "
        "evenly over them; more than there are: all of them); LoRA weights and optimizer state stay on the GPU. "
        "Needs gradient_checkpointing; bf16 or int8 base weights. none / 0: every block on the GPU.",
    )
    shard_base: bool = Field(
        False,
        description="Shard the frozen base model over the training processes (FSDP2): each GPU holds 1/N of the "
        "weights, so a model larger than one card trains on several (N >= 2 processes; bf16 base, peft LoRA). Costs "
        "an all-gather of each block's weights per forward and backward; regional compile is not used with it.",
    )
    context_parallel: int = Field(
        1, ge=1,
        description="Split each sample's video tokens over this many training processes (Ulysses context parallel, "
        "through diffusers): activations per GPU shrink about that many times, for 720p and long clips. Groups of "
        "this many consecutive processes train on one sample; the rest is data parallel (8 GPUs with 2: 4 samples "
        "per step). Must divide the process count and the model's attention heads (12 at 1.3B, 40 at 14B); "
        "1 turns it off. Not combined with shard_base, TREAD or CREPA.",
    )

    @field_validator("context_parallel", mode="before")
    @classmethod
    def _no_bool_degree(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("context_parallel is a number of processes per sample (2, 4, ...), not true/false: "
                             "e.g. context_parallel = 2; 1 turns it off")
        return v

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
        if self.streamed_blocks and self.gradient_checkpointing == "none":
            raise ValueError('streamed_blocks needs gradient_checkpointing = "selective" or "full": a block that keeps '
                             "its activations for backward keeps references to the weights it streamed in")
        if self.activation_offload and self.gradient_checkpointing == "none":
            raise ValueError('activation_offload needs gradient_checkpointing = "selective" or "full": without '
                             "checkpointing every block's full activations (~2.8 GiB per 1.3B block at 832x480x81) "
                             "would cross PCIe each step")
        return self

    @field_validator("streamed_blocks")
    @classmethod
    def _zero_streams_nothing(cls, v: int | None) -> int | None:
        return v or None

    @field_validator("base_quantization", mode="before")
    @classmethod
    def _no_four_bit(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in {"nf4", "int4", "fp4", "4bit", "int4_weight_only"}:
            raise ValueError(f'"{v}" is refused for Wan (4-bit base weights ruin video quality): use "int8"')
        if isinstance(v, str) and v.lower() in {"float8", "fp8_e4m3", "fp8-torchao", "fp8-quanto"}:
            return "fp8"
        return v
