"""`wanforge import-simpletuner` on a realistic SimpleTuner Wan setup (config.json + multidatabackend.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.simpletuner import import_simpletuner
from trainer.config.data import four_k_plus_one
from trainer.config.files import config_from_dict, load_config
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕"

# The shape of SimpleTuner's Wan quickstart config, with the options its docs add (TREAD, CREPA, rollout, quantised).
CONFIG = {
    "resume_from_checkpoint": "latest",
    "quantize_via": "cpu",
    "attention_mechanism": "sageattention",
    "data_backend_config": "config/wan/multidatabackend.json",
    "aspect_bucket_rounding": 2,
    "seed": 42,
    "minimum_image_size": 0,
    "offload_during_startup": True,
    "disable_benchmark": False,
    "output_dir": "output/wan",
    "lora_type": "standard",
    "max_train_steps": 4000,
    "num_train_epochs": 0,
    "checkpoint_step_interval": 500,
    "checkpoints_total_limit": 5,
    "hub_model_id": "someone/wan-disney",
    "push_to_hub": "true",
    "push_checkpoints_to_hub": "false",
    "tracker_project_name": "lora-training",
    "tracker_run_name": "wan-adamW",
    "report_to": "wandb",
    "model_type": "lora",
    "pretrained_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "pretrained_t5_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "model_family": "wan",
    "model_flavour": "t2v-480p-1.3b-2.1",
    "train_batch_size": 2,
    "gradient_checkpointing": True,
    "gradient_accumulation_steps": 1,
    "caption_dropout_probability": 0.1,
    "resolution_type": "pixel_area",
    "resolution": 480,
    "validation_seed": 42,
    "validation_step_interval": 100,
    "validation_resolution": "832x480",
    "validation_prompt": "two anthropomorphic cats boxing on a stage",
    "validation_negative_prompt": NEGATIVE,
    "validation_guidance": 5.2,
    "validation_num_inference_steps": 40,
    "validation_num_video_frames": 75,
    "mixed_precision": "bf16",
    "optimizer": "optimi-lion",
    "learning_rate": 0.00005,
    "max_grad_norm": 0.01,
    "grad_clip_method": "value",
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "base_model_precision": "nf4-bnb",
    "base_model_default_dtype": "bf16",
    "vae_batch_size": 1,
    "webhook_config": "config/wan/webhook.json",
    "compress_disk_cache": True,
    "use_ema": True,
    "ema_validation": "ema_only",
    "ema_update_interval": 2,
    "delete_problematic_images": "true",
    "disable_bucket_pruning": True,
    "validation_guidance_skip_layers": [9],
    "validation_guidance_skip_layers_start": 0.0,
    "validation_guidance_skip_layers_stop": 1.0,
    "lora_rank": 16,
    "flow_schedule_shift": 3,
    "validation_prompt_library": False,
    "user_prompt_library": "config/user_prompt_library.json",
    "strict_epoch_limit": False,
    "vae_enable_tiling": True,
    "tread_config": {"routes": [
        {"selection_ratio": 0.1, "start_layer_idx": 2, "end_layer_idx": 8},
        {"selection_ratio": 0.25, "start_layer_idx": 9, "end_layer_idx": 11},
        {"selection_ratio": 0.35, "start_layer_idx": 12, "end_layer_idx": 15},
        {"selection_ratio": 0.25, "start_layer_idx": 16, "end_layer_idx": 23},
        {"selection_ratio": 0.1, "start_layer_idx": 24, "end_layer_idx": -2},
    ]},
    "crepa_enabled": True,
    "crepa_block_index": 8,
    "crepa_lambda": 0.5,
    "crepa_adjacent_distance": 1,
    "crepa_adjacent_tau": 1.0,
    "crepa_encoder": "dinov2_vits14",
    "crepa_spatial_align": True,
    "scheduled_sampling_max_step_offset": 5,
    "scheduled_sampling_probability": 0.25,
    "scheduled_sampling_sampler": "unipc",
    "--flow_schedule_auto_shift": False,
}

BACKEND = [
    {
        "id": "disney-black-and-white",
        "type": "local",
        "dataset_type": "video",
        "crop": False,
        "resolution": 480,
        "minimum_image_size": 480,
        "maximum_image_size": 480,
        "target_downsample_size": 480,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/wan/disney-black-and-white",
        "instance_data_dir": "datasets/disney-black-and-white",
        "disabled": False,
        "caption_strategy": "textfile",
        "metadata_backend": "discovery",
        "repeats": 0,
        "video": {"num_frames": 75, "min_frames": 75, "bucket_strategy": "aspect_ratio"},
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/wan",
        "disabled": False,
        "write_batch_size": 128,
    },
]


@pytest.fixture
def simpletuner_root(tmp_path) -> Path:
    """A SimpleTuner working folder: config/wan/*.json and the dataset folder its relative paths name."""
    root = tmp_path / "SimpleTuner"
    (root / "config" / "wan").mkdir(parents=True)
    (root / "datasets" / "disney-black-and-white").mkdir(parents=True)
    (root / "config" / "wan" / "config.json").write_text(json.dumps(CONFIG, ensure_ascii=False, indent=2))
    (root / "config" / "wan" / "multidatabackend.json").write_text(json.dumps(BACKEND, indent=2))
    return root


def test_import_maps_the_quickstart(simpletuner_root, tmp_path):
    out = tmp_path / "wanforge" / "wan.toml"
    conv = import_simpletuner(simpletuner_root / "config/wan/config.json", out, root=simpletuner_root)
    cfg = load_config(out)
    root = simpletuner_root.resolve()
    assert cfg.model.flavour == "t2v-480p-1.3b-2.1" and cfg.model.pretrained_model_name_or_path is None
    assert cfg.lora.rank == 16 and cfg.lora.lora_type == "lora"
    assert cfg.train.max_train_steps == 4000 and cfg.train.train_batch_size == 2 and cfg.train.seed == 42
    assert cfg.train.max_grad_value == 0.01 and cfg.train.max_grad_norm is None  # grad_clip_method = value
    assert cfg.train.mixed_precision == "bf16" and cfg.train.output_dir == root / "output" / "wan"
    assert cfg.optim.learning_rate == 5e-5 and cfg.optim.lr_scheduler == "cosine" and cfg.optim.lr_warmup_steps == 100
    assert cfg.optim.optimizer == "adamw"
    assert cfg.checkpoint.every_n_steps == 500 and cfg.checkpoint.total_limit == 5
    assert cfg.memory.gradient_checkpointing == "selective" and cfg.memory.attention_backend == "sage"
    assert cfg.memory.base_quantization == "int8"  # nf4 refused for Wan
    assert cfg.hub.push_to_hub is True and cfg.hub.push_checkpoints_to_hub is False
    assert cfg.hub.hub_model_id == "someone/wan-disney"
    assert cfg.tracking.report_to == "wandb" and cfg.tracking.project == "lora-training"
    assert cfg.tracking.webhook_config == root / "config/wan/webhook.json"
    assert cfg.ema.use_ema and cfg.ema.validation == "ema_only" and cfg.ema.update_interval == 2
    v = cfg.validation
    assert (v.width, v.height, v.num_frames) == (832, 480, 73)
    assert v.every_n_steps == 100 and v.seed == 42 and v.guidance_scale == 5.2 and v.num_inference_steps == 40
    assert v.negative_prompt == NEGATIVE and v.prompt.startswith("two anthropomorphic cats")
    assert v.skip_layers == [9] and (v.skip_layer_start, v.skip_layer_stop) == (0.0, 1.0)
    assert v.prompt_library == root / "config/user_prompt_library.json"
    assert cfg.flow.timestep_sampling == "shift" and cfg.flow.shift == 3.0
    assert cfg.cache.compress_latents is True
    assert [(r.selection_ratio, r.start_layer_idx, r.end_layer_idx) for r in cfg.tread.routes][-1] == (0.1, 24, -2)
    assert len(cfg.tread.routes) == 5
    assert cfg.crepa.enabled and cfg.crepa.block_index == 8 and cfg.crepa.weight == 0.5
    assert cfg.crepa.encoder == "dinov2_vits14" and cfg.crepa.encoder_image_size == 224
    assert cfg.scheduled_sampling.probability == 0.25 and cfg.scheduled_sampling.steps == 5

    (ds,) = cfg.datasets
    assert ds.id == "disney-black-and-white" and ds.path == root / "datasets/disney-black-and-white"
    assert ds.num_frames == 73 and ds.min_frames == 73 and ds.bucket_strategy == "aspect_ratio"  # min <= num
    assert ds.repeats == 1  # SimpleTuner repeats 0 = seen once
    assert ds.crop is False and ds.resolution == 480 and ds.resolution_type == "pixel_area"
    assert ds.maximum_image_size == 480 and ds.target_downsample_size == 480
    assert ds.caption_dropout_probability == 0.1 and ds.delete_problematic is True
    assert ds.cache_dir == root / "cache/vae/wan/disney-black-and-white" and ds.text_cache_dir == root / "cache/text/wan"

    fixes = "\n".join(conv.fixes)
    assert "video.num_frames = 75 is not 4k+1" in fixes and "validation_num_video_frames = 75" in fixes
    assert "video.min_frames = 75 is above num_frames = 73: using 73" in fixes
    assert "optimi-lion" in fixes and "nf4-bnb" in fixes
    warning = conv.warning()
    for key in ("aspect_bucket_rounding", "disable_bucket_pruning", "quantize_via", "offload_during_startup",
                "vae_enable_tiling", "crepa_spatial_align", "scheduled_sampling_sampler", "write_batch_size"):
        assert key in warning, key
    for mapped in ("lora_rank", "tread_config", "crepa_lambda", "validation_guidance", "num_train_epochs",
                   "flow_schedule_auto_shift", "metadata_backend", "disable_benchmark", "strict_epoch_limit"):
        assert mapped not in warning, mapped
    assert any("--resume latest" in n for n in conv.notes)


def test_cli_writes_the_toml_and_one_warning(simpletuner_root, tmp_path):
    out = tmp_path / "wan.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "import-simpletuner", "config/wan/config.json",
         "--backend", "config/wan/multidatabackend.json", "-o", str(out)],
        capture_output=True, text=True, timeout=120, cwd=simpletuner_root,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # run from SimpleTuner's folder, as a user would
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"wrote {out}" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "quantize_via" in warnings[0]
    assert "fixed: backend[0] (disney-black-and-white) video.num_frames = 75 is not 4k+1" in proc.stderr
    assert load_config(out).datasets[0].path == (simpletuner_root / "datasets/disney-black-and-white").resolve()


def test_importer_needs_no_torch():
    code = ("import sys, launcher.simpletuner, launcher.cli; "
            "sys.exit(1 if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_fixes_and_refusals(simpletuner_root, tmp_path):
    cfg_path = simpletuner_root / "config/wan/config.json"

    def run(config, backend=BACKEND):
        cfg_path.write_text(json.dumps(config))
        (simpletuner_root / "config/wan/multidatabackend.json").write_text(json.dumps(backend))
        return import_simpletuner(cfg_path, tmp_path / "out.toml", root=simpletuner_root)

    with pytest.raises(UserError, match="model_family"):
        run({**CONFIG, "model_family": "flux"})
    with pytest.raises(UserError, match="--backend"):
        run({k: v for k, v in CONFIG.items() if k != "data_backend_config"})
    with pytest.raises(UserError, match='type = "aws"'):
        run(CONFIG, [{**BACKEND[0], "type": "aws"}])
    with pytest.raises(UserError, match="tread.routes"):  # schema errors name our field
        run({**CONFIG, "tread_config": {"routes": [{"selection_ratio": 1.5, "start_layer_idx": 0, "end_layer_idx": 2}]}})

    lycoris = simpletuner_root / "config/wan/lycoris_config.json"
    lycoris.write_text(json.dumps({"algo": "lokr", "factor": 16}))
    conv = run({**CONFIG, "lora_type": "lycoris", "lycoris_config": "config/wan/lycoris_config.json",
                "model_flavour": "i2v-14b-2.1", "pretrained_model_name_or_path": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                "base_model_precision": "int8-quanto",
                "grad_clip_method": "norm", "max_grad_norm": 1.0, "flow_schedule_auto_shift": True,
                "validation_resolution": "1280x721", "optimizer": "bnb-adamw8bit"},
               [{**BACKEND[0], "repeats": 2, "video": {"num_frames": 81, "frame_interval": 6}}])
    cfg = load_config(tmp_path / "out.toml")
    assert cfg.lora.lora_type == "lycoris" and cfg.lora.lycoris_config == lycoris.resolve()
    assert cfg.model.flavour == "i2v-480p-14b-2.1" and cfg.model.pretrained_model_name_or_path is None  # an alias
    assert cfg.memory.base_quantization == "int8" and cfg.train.max_grad_norm == 1.0 and cfg.train.max_grad_value is None
    assert cfg.flow.timestep_sampling == "shift"  # the explicit shift stays, auto-shift is refused
    assert cfg.validation.height == 720 and cfg.optim.optimizer == "adamw8bit"
    assert cfg.datasets[0].repeats == 3 and cfg.datasets[0].num_frames == 81 and cfg.datasets[0].frame_interval == 8
    fixes = "\n".join(conv.fixes)
    assert "auto_shift" in fixes and "1280x721" not in fixes and "height = 721" in fixes and "frame_interval = 6" in fixes

    run({**CONFIG, "base_model_precision": "fp8-torchao"})  # real fp8 matmuls here too
    assert load_config(tmp_path / "out.toml").memory.base_quantization == "fp8"


QUICKSTART = Path(__file__).parent / "fixtures" / "simpletuner_wan"  # SimpleTuner's Wan quickstart pair, as users have it


def test_the_quickstart_pair_imports_as_written(tmp_path):
    """config.json + multidatabackend.json as the quickstart writes them (bare hub_model_id, min_frames = num_frames =
    75, 84 validation frames): imported with `wanforge import-simpletuner` and no extra flag, then loaded by the schema."""
    root = tmp_path / "SimpleTuner"
    (root / "config" / "wan").mkdir(parents=True)
    (root / "datasets" / "disney-black-and-white").mkdir(parents=True)
    for name in ("config.json", "multidatabackend.json"):
        (root / "config" / "wan" / name).write_bytes((QUICKSTART / name).read_bytes())
    out = tmp_path / "wan.toml"
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "import-simpletuner", "config/wan/config.json", "-o",
                           str(out)], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(out)
    assert cfg.hub.hub_model_id == "wan-disney" and cfg.hub.push_to_hub  # resolved to the token's owner at push time
    (ds,) = cfg.datasets
    assert ds.min_frames <= ds.num_frames == 73
    assert cfg.validation.num_frames == 85 == four_k_plus_one(84)  # the schema's rule: the same from a TOML
    assert config_from_dict({"datasets": [{"path": "x", "num_frames": 84}]}).datasets[0].num_frames == 85
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 16 and cfg.memory.base_quantization == "int8"
    assert cfg.checkpoint.every_n_steps == 100 and cfg.model.flavour == "t2v-480p-1.3b-2.1"
    assert "validation_num_video_frames = 84 is not 4k+1 (Wan's VAE packs 4 frames into one): using 85" in proc.stderr


@pytest.mark.parametrize("frames, expected", [(1, 1), (2, 1), (3, 1), (4, 5), (80, 81), (83, 81), (84, 85), (87, 85),
                                              (88, 89)])
def test_one_four_k_plus_one_rule(frames, expected, tmp_path):
    assert four_k_plus_one(frames) == expected
    assert config_from_dict({"datasets": [{"path": "x", "num_frames": frames}]}).datasets[0].num_frames == expected
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({"validation_num_video_frames": frames}))
    (tmp_path / "b.json").write_text(json.dumps([{**BACKEND[0], "video": {"num_frames": frames}}]))
    (tmp_path / "datasets" / "disney-black-and-white").mkdir(parents=True)
    import_simpletuner(cfg_path, tmp_path / "out.toml", tmp_path / "b.json", root=tmp_path)
    cfg = load_config(tmp_path / "out.toml")
    assert cfg.datasets[0].num_frames == expected == cfg.validation.num_frames
