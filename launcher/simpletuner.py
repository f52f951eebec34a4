"""`wanforge import-simpletuner`: a SimpleTuner Wan config.json (+ multidatabackend.json) as a wanforge TOML.

Every option SimpleTuner's Wan quickstart uses maps to a wanforge field; options with no counterpart are listed in one
warning; values that are wrong for Wan (frame counts that are not 4k+1, 4-bit base weights, auto-shift, ...) are
fixed, each with a message. The mapping was written from SimpleTuner's documentation (option names and meanings);
the result is validated by wanforge's own schema before it is written. Imports only trainer.config (no torch).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from trainer.config.data import four_k_plus_one
from trainer.config.files import config_from_dict
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError
from trainer.flavours import FLAVOURS, resolve_flavour_name

DEFAULT_ST_FLAVOUR = "t2v-480p-1.3b-2.1"  # SimpleTuner's Wan default


@dataclass
class Conversion:
    data: dict[str, Any] = field(default_factory=dict)  # raw wanforge config (TOML tables)
    fixes: list[str] = field(default_factory=list)  # values changed because they are wrong for Wan or for us
    notes: list[str] = field(default_factory=list)  # things the user should know (CLI flags, semantics)
    unsupported: list[str] = field(default_factory=list)  # options with no counterpart (one warning)

    def set(self, path: str, value: Any) -> None:
        section, _, name = path.partition(".")
        self.data.setdefault(section, {})[name] = value

    def warning(self) -> str | None:
        if not self.unsupported:
            return None
        return ("warning: these SimpleTuner options have no counterpart in wanforge and were left out: "
                + ", ".join(self.unsupported))


# ---------------------------------------------------------------- value helpers


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _frames(value: Any, where: str, conv: Conversion) -> int:
    """4k+1 frames (the Wan VAE packs 4 frames into one latent frame), by the schema's own rounding rule."""
    n = int(value)
    fixed = four_k_plus_one(n)
    if fixed != n:
        conv.fixes.append(f"{where} = {n} is not 4k+1 (Wan's VAE packs 4 frames into one): using {fixed}")
    return fixed


def _size(value: int, where: str, conv: Conversion) -> int:
    if value % 16 == 0:
        return value
    fixed = max(16, round(value / 16) * 16)
    conv.fixes.append(f"{where} = {value} is not a multiple of 16 (VAE 8x, patch 2x): using {fixed}")
    return fixed


def _path(value: str, root: Path, out_dir: Path) -> str:
    """SimpleTuner resolves relative paths from where it runs (`root`); ours are relative to the TOML file."""
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = (root / p).resolve()
    try:
        return os.path.relpath(p, out_dir)
    except ValueError:  # another drive (Windows)
        return str(p)


# ---------------------------------------------------------------- config.json

# Options that are the same thing under another name: SimpleTuner key -> wanforge section.field (+ converter).
RENAMES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "lora_rank": ("lora.rank", int),
    "lora_alpha": ("lora.alpha", float),
    "lora_dropout": ("lora.dropout", float),
    "max_train_steps": ("train.max_train_steps", int),
    "train_batch_size": ("train.train_batch_size", int),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", int),
    "seed": ("train.seed", int),
    "learning_rate": ("optim.learning_rate", float),
    "lr_warmup_steps": ("optim.lr_warmup_steps", int),
    "adam_beta1": ("optim.adam_beta1", float),
    "adam_beta2": ("optim.adam_beta2", float),
    "adam_epsilon": ("optim.adam_epsilon", float),
    "adam_weight_decay": ("optim.weight_decay", float),
    "checkpoint_step_interval": ("checkpoint.every_n_steps", int),
    "checkpointing_steps": ("checkpoint.every_n_steps", int),
    "checkpoints_total_limit": ("checkpoint.total_limit", int),
    "validation_step_interval": ("validation.every_n_steps", int),
    "validation_steps": ("validation.every_n_steps", int),
    "validation_seed": ("validation.seed", int),
    "validation_prompt": ("validation.prompt", str),
    "validation_negative_prompt": ("validation.negative_prompt", str),
    "validation_guidance": ("validation.guidance_scale", float),
    "validation_num_inference_steps": ("validation.num_inference_steps", int),
    "validation_guidance_skip_layers": ("validation.skip_layers", lambda v: [int(i) for i in v]),
    "validation_guidance_skip_layers_start": ("validation.skip_layer_start", float),
    "validation_guidance_skip_layers_stop": ("validation.skip_layer_stop", float),
    "validation_guidance_skip_scale": ("validation.skip_layer_scale", float),
    "instance_prompt": ("validation.instance_prompt", str),
    "use_ema": ("ema.use_ema", _bool),
    "ema_decay": ("ema.decay", float),
    "ema_update_interval": ("ema.update_interval", int),
    "ema_validation": ("ema.validation", str),
    "hub_model_id": ("hub.hub_model_id", str),
    "push_to_hub": ("hub.push_to_hub", _bool),
    "push_checkpoints_to_hub": ("hub.push_checkpoints_to_hub", _bool),
    "tracker_project_name": ("tracking.project", str),
    "tracker_run_name": ("tracking.run_name", str),
    "wan_validation_load_other_stage": ("model.wan_validation_load_other_stage", _bool),
    "wan_force_2_1_time_embedding": ("model.wan_force_2_1_time_embedding", _bool),
    "revision": ("model.revision", str),
    "pretrained_transformer_model_name_or_path": ("model.pretrained_transformer_model_name_or_path", str),
    "pretrained_transformer_subfolder": ("model.pretrained_transformer_subfolder", str),
    "vae_batch_size": ("cache.vae_batch_size", int),
    "compress_disk_cache": ("cache.compress_latents", _bool),
    "crepa_enabled": ("crepa.enabled", _bool),
    "crepa_block_index": ("crepa.block_index", int),
    "crepa_lambda": ("crepa.weight", float),
    "crepa_adjacent_distance": ("crepa.adjacent_distance", int),
    "crepa_adjacent_tau": ("crepa.temporal_decay", float),
    "crepa_encoder": ("crepa.encoder", str),
    "crepa_model": ("crepa.encoder", str),
    "crepa_encoder_image_size": ("crepa.encoder_image_size", int),
    "scheduled_sampling_probability": ("scheduled_sampling.probability", float),
    "scheduled_sampling_prob_start": ("scheduled_sampling.probability_start", float),
    "scheduled_sampling_prob_end": ("scheduled_sampling.probability", float),
    "scheduled_sampling_ramp_steps": ("scheduled_sampling.ramp_steps", int),
}

# Keys whose value means "off" or "the default" need no counterpart.
_NEUTRAL = {
    "num_train_epochs": (0, "0"), "validation_prompt_library": (False, "false"), "resume_from_checkpoint": None,
    "model_type": ("lora",), "model_family": None, "data_backend_config": None, "pretrained_t5_model_name_or_path": None,
    "pretrained_model_name_or_path": None, "pretrained_vae_model_name_or_path": None,
    "text_encoder_1_precision": ("no_change",), "scheduled_sampling_max_step_offset": (0,),
}


def _convert_options(st: dict[str, Any], conv: Conversion, root: Path, out_dir: Path) -> None:
    handled = set(RENAMES)
    for key, (target, cast) in RENAMES.items():
        if key in st and st[key] is not None:
            conv.set(target, cast(st[key]))
    handled |= _model(st, conv, root, out_dir)
    handled |= _training(st, conv, root, out_dir)
    handled |= _validation(st, conv, root, out_dir)
    handled |= _extras(st, conv)
    dataset_defaults = {"caption_dropout_probability", "resolution", "resolution_type", "minimum_image_size",
                        "maximum_image_size", "target_downsample_size", "delete_problematic_images"}
    handled |= dataset_defaults  # applied per dataset in _convert_backends
    for key in st:
        if key in handled:
            continue
        neutral = _NEUTRAL.get(key, ())
        if key in _NEUTRAL and (neutral is None or st[key] in neutral):
            continue
        if st[key] is None or st[key] is False or str(st[key]).lower() == "false":
            continue  # an option left off needs no counterpart
        conv.unsupported.append(f"{key}={json.dumps(st[key], ensure_ascii=False)[:40]}")


def _model(st: dict[str, Any], conv: Conversion, root: Path, out_dir: Path) -> set[str]:
    family = str(st.get("model_family", "wan"))
    if family != "wan":
        raise UserError(f'config.json: model_family = "{family}": wanforge trains Wan models only (model_family "wan")')
    if str(st.get("model_type", "lora")) != "lora":
        conv.fixes.append(f'model_type = "{st["model_type"]}": wanforge trains LoRA adapters only: importing as a LoRA')
    name = st.get("model_flavour")
    base = st.get("pretrained_model_name_or_path")
    if name is None:
        name = next((f.name for f in FLAVOURS.values() if base and f.hub_id == base), DEFAULT_ST_FLAVOUR)
    flavour = resolve_flavour_name(str(name))
    if flavour is None:
        raise UserError(f'config.json: model_flavour = "{name}" is not a Wan flavour wanforge knows '
                        f'({", ".join(n for n in FLAVOURS if not n.startswith("tiny"))})')
    conv.set("model.flavour", flavour)
    if base and base != FLAVOURS[flavour].hub_id:
        conv.set("model.pretrained_model_name_or_path", _local_or_hub(base, root, out_dir))
    vae = st.get("pretrained_vae_model_name_or_path")
    if vae and vae not in (base, FLAVOURS[flavour].hub_id):
        conv.set("model.pretrained_vae_model_name_or_path", _local_or_hub(vae, root, out_dir))
    t5 = st.get("pretrained_t5_model_name_or_path")
    if t5 and t5 not in (base, FLAVOURS[flavour].hub_id):
        conv.unsupported.append(f"pretrained_t5_model_name_or_path={t5} (the text encoder comes from the base model)")
    if "base_model_default_dtype" in st:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(str(st["base_model_default_dtype"]))
        if dtype is None:
            conv.fixes.append(f'base_model_default_dtype = "{st["base_model_default_dtype"]}": using bfloat16')
            dtype = "bfloat16"
        conv.set("model.base_dtype", dtype)
    precision = str(st.get("base_model_precision", "no_change")).lower()
    if precision.startswith("int8"):
        conv.set("memory.base_quantization", "int8")
    elif precision.startswith("fp8"):  # fp8-torchao, fp8-quanto, fp8uz-quanto: real fp8 matmuls here
        conv.set("memory.base_quantization", "fp8")
    elif "4" in precision.split("-")[0]:  # nf4-bnb, int4-quanto, fp4, ...
        conv.fixes.append(f'base_model_precision = "{precision}": 4-bit base weights ruin Wan quality: using int8')
        conv.set("memory.base_quantization", "int8")
    elif precision != "no_change":
        conv.fixes.append(f'base_model_precision = "{precision}" is not offered: using int8 (half the bf16 memory)')
        conv.set("memory.base_quantization", "int8")
    lora_type = str(st.get("lora_type", "standard")).lower()
    if lora_type == "lycoris":
        conv.set("lora.lora_type", "lycoris")
        if st.get("lycoris_config"):
            conv.set("lora.lycoris_config", _path(st["lycoris_config"], root, out_dir))
    elif lora_type != "standard":
        conv.fixes.append(f'lora_type = "{lora_type}": using a standard LoRA')
    if "lora_format" in st:
        fmt = str(st["lora_format"]).lower()
        conv.set("lora.save_format", "diffusers" if fmt == "diffusers" else "comfyui")
    return {"model_family", "model_type", "model_flavour", "pretrained_model_name_or_path",
            "pretrained_vae_model_name_or_path", "pretrained_t5_model_name_or_path", "base_model_default_dtype",
            "base_model_precision", "lora_type", "lycoris_config", "lora_format"}


def _local_or_hub(value: str, root: Path, out_dir: Path) -> str:
    looks_local = value.startswith((".", "/", "~")) or (root / value).exists()
    return _path(value, root, out_dir) if looks_local else value


def _training(st: dict[str, Any], conv: Conversion, root: Path, out_dir: Path) -> set[str]:
    if "output_dir" in st:
        conv.set("train.output_dir", _path(st["output_dir"], root, out_dir))
    if "mixed_precision" in st:
        mp = str(st["mixed_precision"]).lower()
        conv.set("train.mixed_precision", mp if mp in ("bf16", "fp16", "no") else "auto")
        if mp not in ("bf16", "fp16", "no"):
            conv.fixes.append(f'mixed_precision = "{mp}": using auto (bf16 where the GPU has it)')
    if "max_grad_norm" in st:
        value = float(st["max_grad_norm"])
        if str(st.get("grad_clip_method", "norm")).lower() == "value":
            conv.set("train.max_grad_value", value)
            conv.set("train.max_grad_norm", "none")
        elif value > 0:
            conv.set("train.max_grad_norm", value)
        else:
            conv.set("train.max_grad_norm", "none")
    if int(st.get("num_train_epochs", 0) or 0) > 0 and not st.get("max_train_steps"):
        conv.unsupported.append(f"num_train_epochs={st['num_train_epochs']} (set train.max_train_steps)")
    if st.get("resume_from_checkpoint"):
        conv.notes.append("resume_from_checkpoint: pass `wanforge train CONFIG --resume latest` (a flag, not a setting)")
    optimizer = str(st.get("optimizer", "adamw_bf16")).lower()
    choices = WanforgeConfig.model_fields["optim"].annotation.model_fields["optimizer"].annotation.__args__
    if "8bit" in optimizer and "adamw8bit" in choices:
        conv.set("optim.optimizer", "adamw8bit")
    elif optimizer in choices:
        conv.set("optim.optimizer", optimizer)
    else:
        conv.set("optim.optimizer", "adamw")
        if optimizer not in ("adamw_bf16", "adamw", "adamw_torch", "adamw_schedulefree"):
            conv.fixes.append(f'optimizer = "{optimizer}" is not offered: using adamw (LoRA weights kept in fp32)')
    if "lr_scheduler" in st:
        schedules = WanforgeConfig.model_fields["optim"].annotation.model_fields["lr_scheduler"].annotation.__args__
        sched = str(st["lr_scheduler"])
        if sched in schedules:
            conv.set("optim.lr_scheduler", sched)
        else:
            conv.fixes.append(f'lr_scheduler = "{sched}" is not offered: using cosine')
            conv.set("optim.lr_scheduler", "cosine")
    if "gradient_checkpointing" in st:
        on = _bool(st["gradient_checkpointing"])
        conv.set("memory.gradient_checkpointing", "selective" if on else "none")
        if on:
            conv.notes.append('gradient_checkpointing = true -> memory.gradient_checkpointing = "selective" (keeps '
                              'attention outputs, ~10% recompute); "full" is SimpleTuner\'s full per-block recompute')
    attention = st.get("attention_mechanism")
    if attention is not None:
        backend = {"diffusers": "auto", "sageattention": "sage", "flash-attn": "flash", "flash_attn": "flash",
                   "flash-attn-3": "_flash_3", "fa3": "_flash_3"}.get(str(attention).lower())
        if backend is None:
            conv.fixes.append(f'attention_mechanism = "{attention}" is not offered: using auto (cuDNN SDPA on NVIDIA)')
            backend = "auto"
        conv.set("memory.attention_backend", backend)
    if _bool(st.get("enable_chunked_feed_forward", False)):
        size = int(st.get("feed_forward_chunk_size", 0) or 0)
        if size < 256:  # ours counts tokens per chunk; tiny chunks would crawl
            conv.fixes.append(f"feed_forward_chunk_size = {size}: wanforge counts tokens per chunk: using 4096")
            size = 4096
        conv.set("memory.feed_forward_chunk_size", size)
    memory_fields = WanforgeConfig.model_fields["memory"].annotation.model_fields
    handled = {"output_dir", "mixed_precision", "max_grad_norm", "grad_clip_method", "resume_from_checkpoint",
               "optimizer", "lr_scheduler", "gradient_checkpointing", "attention_mechanism",
               "enable_chunked_feed_forward", "feed_forward_chunk_size"}
    if _bool(st.get("enable_group_offload", False)):
        if "group_offload" in memory_fields:
            conv.set("memory.group_offload", True)
            for key in ("group_offload_use_stream", "group_offload_to_disk_path"):
                if key in st and key in memory_fields:
                    conv.set(f"memory.{key}", _bool(st[key]) if key.endswith("stream") else str(st[key]))
                    handled.add(key)
        else:
            conv.unsupported.append("enable_group_offload=true")
        handled.add("enable_group_offload")
    report = str(st.get("report_to", "none")).lower()
    if "report_to" in st:
        conv.set("tracking.report_to", report if report in ("wandb", "tensorboard") else "none")
        if report not in ("wandb", "tensorboard", "none"):
            conv.unsupported.append(f"report_to={report}")
        handled.add("report_to")
    if st.get("webhook_config"):
        conv.set("tracking.webhook_config", _path(st["webhook_config"], root, out_dir))
        handled.add("webhook_config")
    return handled


def _validation(st: dict[str, Any], conv: Conversion, root: Path, out_dir: Path) -> set[str]:
    if "validation_resolution" in st:
        text = str(st["validation_resolution"]).split(",")[0].strip().lower()
        w, _, h = text.partition("x")
        width, height = int(float(w)), int(float(h or w))
        conv.set("validation.width", _size(width, "validation_resolution width", conv))
        conv.set("validation.height", _size(height, "validation_resolution height", conv))
    if "validation_num_video_frames" in st:
        conv.set("validation.num_frames", _frames(st["validation_num_video_frames"], "validation_num_video_frames", conv))
    if st.get("user_prompt_library"):
        conv.set("validation.prompt_library", _path(st["user_prompt_library"], root, out_dir))
    scheduler = st.get("validation_noise_scheduler")
    if scheduler is not None:
        chosen = {"unipc": "unipc", "flow_matching": "flow_match_euler", "flow_match_euler": "flow_match_euler",
                  "euler": "flow_match_euler"}.get(str(scheduler).lower())
        if chosen is None:
            conv.fixes.append(f'validation_noise_scheduler = "{scheduler}": using unipc (what Wan inference uses)')
            chosen = "unipc"
        conv.set("validation.scheduler", chosen)
    if "validation_disable" in st and _bool(st["validation_disable"]):
        conv.set("validation.every_n_steps", 0)
        conv.set("validation.at_end", False)
    return {"validation_resolution", "validation_num_video_frames", "user_prompt_library", "validation_noise_scheduler",
            "validation_disable"}


def _extras(st: dict[str, Any], conv: Conversion) -> set[str]:
    handled = set()
    if "flow_schedule_shift" in st and st["flow_schedule_shift"] not in (None, 0):
        conv.set("flow.timestep_sampling", "shift")
        conv.set("flow.shift", float(st["flow_schedule_shift"]))
        conv.notes.append("flow_schedule_shift: wanforge applies the shift to uniform draws (flow.timestep_sampling = "
                          '"shift"); SimpleTuner shifts its logit-normal draws')
    if _bool(st.get("flow_schedule_auto_shift", False)):
        conv.fixes.append("flow_schedule_auto_shift: its resolution formula gives absurd shifts for video token "
                          "counts: left off (logit-normal sampling, or set flow.shift)")
    if _bool(st.get("flow_use_uniform_schedule", False)):
        conv.set("flow.timestep_sampling", "uniform")
    if "flow_sigmoid_scale" in st:
        conv.set("flow.logit_std", float(st["flow_sigmoid_scale"]))
    handled |= {"flow_schedule_shift", "flow_schedule_auto_shift", "flow_use_uniform_schedule", "flow_sigmoid_scale"}
    tread = st.get("tread_config")
    if tread:
        routes = tread.get("routes", []) if isinstance(tread, dict) else tread
        conv.set("tread.routes", [
            {"selection_ratio": float(r["selection_ratio"]), "start_layer_idx": int(r["start_layer_idx"]),
             "end_layer_idx": int(r["end_layer_idx"])} for r in routes
        ])
    handled.add("tread_config")
    steps = int(st.get("scheduled_sampling_max_step_offset", 0) or 0)
    if steps > 0:
        conv.set("scheduled_sampling.steps", steps)
        conv.notes.append(f"scheduled_sampling_max_step_offset = {steps} -> scheduled_sampling.steps = {steps} (always that many "
                          "Euler steps, from scheduled_sampling.sigma_offset above the training noise level)")
    elif "scheduled_sampling_probability" in st or "scheduled_sampling_prob_end" in st:
        conv.set("scheduled_sampling.probability", 0.0)  # SimpleTuner: no max_step_offset means no rollout
        conv.set("scheduled_sampling.probability_start", 0.0)
    handled.add("scheduled_sampling_max_step_offset")
    if "crepa_encoder_image_size" not in st and str(st.get("crepa_encoder", st.get("crepa_model", ""))) == "dinov2_vits14":
        conv.set("crepa.encoder_image_size", 224)
    return handled


# ---------------------------------------------------------------- multidatabackend.json

DATASET_RENAMES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "id": ("id", str),
    "disabled": ("disabled", _bool),
    "caption_dropout_probability": ("caption_dropout_probability", float),
    "resolution": ("resolution", float),
    "resolution_type": ("resolution_type", str),
    "minimum_image_size": ("minimum_image_size", float),
    "maximum_image_size": ("maximum_image_size", float),
    "target_downsample_size": ("target_downsample_size", float),
    "crop": ("crop", _bool),
    "instance_prompt": ("instance_prompt", str),
    "probability": ("sampling_weight", float),
    "delete_problematic_images": ("delete_problematic", _bool),
}
_DATASET_NEUTRAL = {"type": ("local",), "dataset_type": None, "metadata_backend": ("discovery",), "default": None}


def _convert_backends(entries: list[dict[str, Any]], st: dict[str, Any], conv: Conversion, root: Path,
                      out_dir: Path) -> None:
    if not isinstance(entries, list):
        raise UserError("multidatabackend.json: expected a JSON list of dataset objects")
    text_cache = next((e.get("cache_dir") for e in entries if e.get("dataset_type") == "text_embeds"), None)
    datasets = []
    for i, entry in enumerate(entries):
        kind = entry.get("dataset_type", "image")
        where = f"backend[{i}] ({entry.get('id', '?')})"
        if kind == "text_embeds":
            for key in entry:
                if key not in ("id", "type", "dataset_type", "default", "cache_dir", "disabled"):
                    conv.unsupported.append(f"{where}.{key}")
            continue
        if kind not in ("video", "image"):
            conv.unsupported.append(f"{where} dataset_type={kind} (I2V conditioning is cached beside the latents)")
            continue
        datasets.append(_dataset(entry, st, conv, where, root, out_dir, text_cache))
    if not datasets:
        raise UserError("multidatabackend.json: no video or image dataset to train on")
    conv.data["datasets"] = datasets


def _dataset(entry: dict[str, Any], st: dict[str, Any], conv: Conversion, where: str, root: Path, out_dir: Path,
             text_cache: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("caption_dropout_probability", "resolution", "resolution_type", "minimum_image_size",
                "maximum_image_size", "target_downsample_size", "delete_problematic_images"):
        if key in st and key not in entry:  # global config.json values are per-dataset defaults in SimpleTuner
            entry = {**entry, key: st[key]}
    handled = set(DATASET_RENAMES) | set(_DATASET_NEUTRAL)
    for key, (target, cast) in DATASET_RENAMES.items():
        if key in entry and entry[key] is not None:
            out[target] = cast(entry[key])
    backend = str(entry.get("type", "local"))
    if backend == "huggingface":
        out["hf_repo"] = str(entry.get("dataset_name") or entry.get("hf_repo") or "")
        out["path"] = _path(entry.get("instance_data_dir") or f"datasets/{entry.get('id', 'hf')}", root, out_dir)
        handled |= {"dataset_name", "hf_repo"}
    elif backend != "local":
        raise UserError(f'multidatabackend.json: {where} type = "{backend}": wanforge reads local folders and Hugging '
                        'Face datasets; download the data into a folder and use type "local"')
    elif "instance_data_dir" in entry:
        out["path"] = _path(entry["instance_data_dir"], root, out_dir)
    else:
        raise UserError(f"multidatabackend.json: {where} has no instance_data_dir")
    handled.add("instance_data_dir")
    if "repeats" in entry:
        out["repeats"] = int(entry["repeats"]) + 1  # SimpleTuner's repeats = N means N + 1 passes
        handled.add("repeats")
    if entry.get("cache_dir_vae"):
        out["cache_dir"] = _path(entry["cache_dir_vae"], root, out_dir)
    if text_cache:
        out["text_cache_dir"] = _path(text_cache, root, out_dir)
    handled.add("cache_dir_vae")
    strategy = str(entry.get("caption_strategy", "textfile"))
    if _bool(entry.get("only_instance_prompt", False)):
        strategy = "instanceprompt"
    if strategy in ("textfile", "filename", "instanceprompt"):
        out["caption_strategy"] = strategy
    elif strategy in ("parquet", "csv", "huggingface"):
        out["caption_strategy"] = "metadata"
        conv.fixes.append(f'{where} caption_strategy = "{strategy}": using "metadata" (metadata.jsonl / .csv rows '
                          "beside the files)")
    else:
        conv.fixes.append(f'{where} caption_strategy = "{strategy}": using "textfile"')
        out["caption_strategy"] = "textfile"
    if out["caption_strategy"] == "instanceprompt" and "instance_prompt" not in out:
        prompt = st.get("instance_prompt")
        if prompt:
            out["instance_prompt"] = str(prompt)
        else:
            raise UserError(f"multidatabackend.json: {where} uses the instance prompt but none is set: add instance_prompt")
    handled |= {"caption_strategy", "only_instance_prompt"}
    if "crop_style" in entry:
        style = str(entry["crop_style"])
        out["crop_style"] = style if style in ("center", "random") else "center"
        if style not in ("center", "random"):
            conv.fixes.append(f'{where} crop_style = "{style}": using "center"')
    if "crop_aspect" in entry:
        aspect = str(entry["crop_aspect"])
        out["crop_aspect"] = "square" if aspect == "square" else "preserve"
        if aspect not in ("square", "preserve"):
            conv.fixes.append(f'{where} crop_aspect = "{aspect}": using "preserve" (the nearest aspect bucket)')
    handled |= {"crop_style", "crop_aspect"}
    video = entry.get("video") or {}
    if entry.get("dataset_type") == "video" or video:
        if "num_frames" in video:
            out["num_frames"] = _frames(video["num_frames"], f"{where} video.num_frames", conv)
        if "min_frames" in video:
            out["min_frames"] = int(video["min_frames"])
        if "max_frames" in video:
            out["max_frames"] = int(video["max_frames"])
        if "bucket_strategy" in video:
            out["bucket_strategy"] = str(video["bucket_strategy"])
        if "frame_interval" in video:
            interval = int(video["frame_interval"])
            fixed = max(4, round(interval / 4) * 4)
            if fixed != interval:
                conv.fixes.append(f"{where} video.frame_interval = {interval}: frame counts are 4k+1: using {fixed}")
            out["frame_interval"] = fixed
        _frames_in_order(out, st, where, conv)
        for key in video:
            if key not in ("num_frames", "min_frames", "max_frames", "bucket_strategy", "frame_interval"):
                conv.unsupported.append(f"{where}.video.{key}")
    handled.add("video")
    for key, value in entry.items():
        neutral = _DATASET_NEUTRAL.get(key, ())
        if key in handled or (key in _DATASET_NEUTRAL and (neutral is None or value in neutral)):
            continue
        conv.unsupported.append(f"{where}.{key}")
    return out


def _frames_in_order(out: dict[str, Any], st: dict[str, Any], where: str, conv: Conversion) -> None:
    """min_frames <= num_frames after rounding (SimpleTuner users often set min_frames = num_frames and
    the 4k+1 rounding then leaves min_frames above it, which would skip every clip of exactly that length)."""
    num = out.get("num_frames")
    if num is None:
        name = resolve_flavour_name(str(st.get("model_flavour", DEFAULT_ST_FLAVOUR))) or DEFAULT_ST_FLAVOUR
        num = FLAVOURS[name].num_frames
    if out.get("min_frames", 0) > num:
        conv.fixes.append(f"{where} video.min_frames = {out['min_frames']} is above num_frames = {num}: using {num}")
        out["min_frames"] = num


# ---------------------------------------------------------------- files


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def convert(config: dict[str, Any], backends: list[dict[str, Any]], root: Path, out_dir: Path) -> Conversion:
    """The wanforge config for a SimpleTuner config.json dict and its multidatabackend.json list."""
    if not isinstance(config, dict):
        raise UserError("config.json: expected a JSON object of options")
    st = {k.removeprefix("--"): v for k, v in config.items()}  # SimpleTuner accepts keys with or without --
    conv = Conversion()
    _convert_options(st, conv, root, out_dir)
    _convert_backends(backends, st, conv, root, out_dir)
    return conv


def import_simpletuner(config_json: str | Path, out: str | Path, backend_json: str | Path | None = None,
                       root: str | Path | None = None) -> Conversion:
    """Read SimpleTuner's files, convert, validate with wanforge's schema, and write the TOML (atomically).

    `root` is where SimpleTuner ran (its relative paths start there; default: the current directory)."""
    config_path, out = Path(config_json), Path(out)
    st = _read_json(config_path, "config.json")
    root = Path(root) if root is not None else Path.cwd()
    if backend_json is None:
        named = (st.get("data_backend_config") or st.get("--data_backend_config")) if isinstance(st, dict) else None
        if not named:
            raise UserError(f"{config_path} names no data_backend_config: pass --backend multidatabackend.json")
        backend_path = Path(named) if Path(named).is_absolute() else root / named
    else:
        backend_path = Path(backend_json)
    backends = _read_json(backend_path, "multidatabackend.json")
    out_dir = out.resolve().parent
    conv = convert(st, backends, root.resolve(), out_dir)
    config_from_dict(conv.data, source=f"{out} (imported from {config_path.name})", base_dir=out_dir)  # validates
    order = list(WanforgeConfig.model_fields)  # sections in the schema's order, [[datasets]] after [model]
    data = {k: conv.data[k] for k in sorted(conv.data, key=order.index)}
    text = "# imported from SimpleTuner by `wanforge import-simpletuner`\n" + tomli_w.dumps(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{out.name}.")  # atomic: never a half-written config
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return conv
