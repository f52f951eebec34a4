"""`wanforge check` is the contract: realistic config mistakes, each refused by `check` with exit 2 and one line that
names the field (or file) and a fix; `train` refuses the same config the same way before it builds any cache; the
fixes it suggests are themselves valid; legal-but-odd values get warnings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from launcher.cli import main
from trainer.model.wan_layout import module_layout

# ---------------------------------------------------------------- helpers


def base_config(data: Path, out: Path) -> dict:
    return {
        "model": {"flavour": "tiny"},
        "datasets": [{"path": str(data), "num_frames": 9, "width": 64, "height": 64}],
        "train": {"output_dir": str(out), "max_train_steps": 2, "train_batch_size": 1},
        "optim": {"learning_rate": 1e-3, "lr_warmup_steps": 0},
        "validation": {"num_inference_steps": 2},
    }


def run_check(capsys, config: Path, *extra: str) -> tuple[int, str]:
    code = main(["check", str(config), *extra])
    captured = capsys.readouterr()
    return code, captured.err


def _drop_none(data):
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return [_drop_none(v) for v in data] if isinstance(data, list) else data


def write_toml(path: Path, data: dict) -> Path:
    """None: the key is left out (TOML has no null)."""
    path.write_text(tomli_w.dumps(_drop_none(data)), encoding="utf-8")
    return path


@pytest.fixture
def env(few_clips, tmp_path):
    """(data folder, run folder, a folder for files the config names)."""
    files = tmp_path / "files"
    files.mkdir()
    return few_clips, tmp_path / "run", files


def _json(path: Path, value) -> str:
    path.write_text(json.dumps(value) if not isinstance(value, str) else value, encoding="utf-8")
    return str(path)


# Each case: (id, change the config dict in place (cfg, files) -> optional --set list, text every error line must
# contain one line of). The config starts valid (test_the_base_config_is_valid).


def _set(section: str, **values):
    def change(cfg, files):
        cfg.setdefault(section, {}).update(values)
    return change


def _ds(**values):
    def change(cfg, files):
        cfg["datasets"][0].update(values)
    return change


def _sets(*assignments):
    def change(cfg, files):
        return list(assignments)
    return change


def _file(section: str, key: str, name: str, content):
    def change(cfg, files):
        cfg.setdefault(section, {})[key] = _json(files / name, content)
    return change


def _tiny_t2v() -> Path:
    from trainer.model.tiny import ensure_tiny_model

    return ensure_tiny_model("t2v-2.1")


def _metadata_dataset(files: Path) -> Path:
    """A copy of two clips with a metadata.jsonl whose caption column is called "text"."""
    from trainer.demo.world import make_demo_dataset

    folder = make_demo_dataset(files / "meta", num_clips=2)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    rows = [json.dumps({"file_name": p.name, "text": "a clip"}) for p in sorted(folder.glob("*.mp4"))]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _hub_token_absent(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


CASES = [
    # ---- --set overrides
    ("set-into-scalar", _sets("train.max_train_steps.x=5"), "train.max_train_steps is a value, not a section"),
    ("set-into-section", _sets("train=5"), "train is a section, not a value"),
    ("set-unknown-key", _sets("train.max_steps=5"), "did you mean train.max_train_steps?"),
    ("set-unknown-section", _sets("trian.seed=1"), 'no field "trian": did you mean train?'),
    ("set-no-equals", _sets("train.max_train_steps"), "expected section.key=value"),
    ("set-list-without-index", _sets("datasets.path=x"), "datasets is a list: name an item by its index"),
    ("set-index-out-of-range", _sets("datasets.3.path=x"), '"3" is not an index of datasets'),
    ("set-list-item-as-value", _sets("datasets.0=5"), "datasets.0 is a table"),
    # ---- schema
    ("typo-key", _set("lora", rnak=4), 'unknown key lora.rnak: did you mean "rank"?'),
    ("key-in-wrong-section", _set("train", learning_rate=1e-4), "it belongs in [optim] as learning_rate"),
    ("wrong-type", _set("train", max_train_steps="many"), "train.max_train_steps"),
    ("literal-typo", _set("optim", optimizer="adam"), 'optim.optimizer: Input should be'),
    ("unknown-flavour", _set("model", flavour="t2v-480p-1.3b"), 'did you mean "t2v-480p-1.3b-2.1"?'),
    ("width-not-16", _ds(width=70), "datasets[0].width: must be a positive multiple of 16"),
    ("frame-interval", _ds(frame_interval=6), "datasets[0].frame_interval: must be a multiple of 4"),
    ("push-without-repo", _set("hub", push_to_hub=True), "hub_model_id"),
    ("instanceprompt-without-prompt", _ds(caption_strategy="instanceprompt"), "instance_prompt"),
    ("two-clippings", _set("train", max_grad_value=1.0), "max_grad_norm or max_grad_value"),
    ("lycoris-without-config", _set("lora", lora_type="lycoris"), "lycoris_config"),
    ("experts-on-2.1", _set("model", train_both_experts=True), "train_both_experts needs a Wan 2.2 A14B flavour"),
    ("offload-without-checkpointing", _set("memory", activation_offload=True, gradient_checkpointing="none"),
     "activation_offload needs gradient_checkpointing"),
    ("nf4", _set("memory", base_quantization="nf4"), "4-bit base weights ruin video quality"),
    ("section-as-value", lambda cfg, files: cfg.update(train="fast"), "train is a section (a table), not a value"),
    ("hub-id-shape", _set("hub", hub_model_id="me/team/lora"), "hub_model_id must be"),
    ("hub-id-chars", _set("hub", hub_model_id="me/my lora"), "hub_model_id must be"),
    ("datasets-single-table", lambda cfg, files: cfg.update(datasets=cfg["datasets"][0]),
     "write [[datasets]] with double brackets"),
    ("dataset-path-empty", _ds(path=""), "datasets[0].path: is empty"),
    ("output-dir-empty", _set("train", output_dir=""), "train.output_dir: is empty"),
    ("targets-a-string", _set("lora", target_modules="attn1.to_q"), 'lora.target_modules = ["attn1.to_q"]'),
    ("skip-layers-a-number", _set("validation", skip_layers=1), "validation.skip_layers = [1]"),
    # ---- numbers the libraries reject
    ("lr-nan", _set("optim", learning_rate=float("nan")), "optim.learning_rate: must be a finite number"),
    ("lr-inf", _set("optim", learning_rate=float("inf")), "optim.learning_rate: must be a finite number"),
    ("logit-mean-nan", _set("flow", logit_mean=float("nan")), "flow.logit_mean: must be a finite number"),
    ("guidance-inf", _set("validation", guidance_scale=float("inf")), "validation.guidance_scale: must be a finite"),
    ("weight-inf", _ds(sampling_weight=float("inf")), "datasets[0].sampling_weight: must be a finite number"),
    ("seed-negative", _set("train", seed=-1), "train.seed: Input should be greater than or equal to 0"),
    ("seed-too-big", _set("train", seed=2**32), "train.seed: Input should be less than or equal to 4294967295"),
    ("validation-seed", _set("validation", seed=-5), "validation.seed"),
    ("eval-seed", _set("validation", eval_seed=2**40), "validation.eval_seed"),
    ("lr-mistyped-exponent", _set("optim", learning_rate=1e6), "optim.learning_rate = 1e+06: no LoRA trains"),
    ("text-length", _set("train", text_max_length=1024), "train.text_max_length = 1024"),
    ("rank-zero", _set("lora", rank=0), "lora.rank: Input should be greater than or equal to 1"),
    # ---- sizes and frames
    ("area-in-pixels", _ds(width=None, height=None, resolution=480, resolution_type="area"),
     'datasets[0].resolution = 480 means 480 megapixels'),
    ("pixels-in-megapixels", _ds(width=None, height=None, resolution=0.5), "datasets[0].resolution = 0.5 means 0.5 pixels"),
    ("negative-resolution", _ds(width=None, height=None, resolution=-1), "datasets[0].resolution = -1 must be above 0"),
    ("max-size-units", _ds(maximum_image_size=1024, target_downsample_size=0.5, resolution_type="area"),
     "datasets[0].maximum_image_size = 1024 means 1024 megapixels"),
    ("max-frames-below-need", _ds(max_frames=4), "datasets[0].max_frames = 4 is below the 9 frames"),
    ("num-frames-zero", _ds(num_frames=0), "datasets[0].num_frames: must be 1 or more"),
    ("validation-width-16", _set("validation", width=70), "validation.width: must be a positive multiple of 16"),
    ("validation-width-ti2v", lambda cfg, files: (cfg["model"].update(flavour="tiny-ti2v"),
                                                  cfg["validation"].update(width=48, height=64)) and None,
     "validation.width = 48 must be a multiple of 32"),
    ("caption-extension-dot", _ds(caption_extension="txt"), 'datasets[0].caption_extension = "txt" must start with a dot'),
    ("crepa-image-size", _set("crepa", enabled=True, encoder_image_size=20), "crepa.encoder_image_size: must be a multiple of 14"),
    ("fixed-size-vs-vae", lambda cfg, files: cfg["model"].update(flavour="tiny-ti2v") or cfg["datasets"][0].update(width=48, height=48),
     "does not fit tiny-ti2v"),
    # ---- files the config names
    ("library-missing", lambda cfg, files: cfg["validation"].update(prompt_library=str(files / "nope.json")),
     "validation.prompt_library:"),
    ("library-bad-json", _file("validation", "prompt_library", "lib.json", "{not json"), "validation.prompt_library:"),
    ("library-a-list", _file("validation", "prompt_library", "lib.json", ["a prompt"]), "must hold a JSON object"),
    ("library-a-folder", lambda cfg, files: cfg["validation"].update(prompt_library=str(files)), "is a folder"),
    ("prompt-token", _set("validation", prompt="a <token> dog"), "validation.prompt uses <token>"),
    ("library-token", _file("validation", "prompt_library", "lib.json", {"dog": "a <token> dog"}),
     "validation.prompt_library 'dog' uses <token>"),
    ("webhook-missing", lambda cfg, files: cfg.setdefault("tracking", {}).update(webhook_config=str(files / "no.json")),
     "tracking.webhook_config"),
    ("webhook-bad-url", _file("tracking", "webhook_config", "hook.json", {"url": "ftp://x"}), "http:// or https://"),
    ("webhook-level", _file("tracking", "webhook_config", "hook.json", {"url": "https://x", "levels": ["debug"]}),
     "unknown levels"),
    ("webhook-timeout-type", _file("tracking", "webhook_config", "hook.json", {"url": "https://x", "timeout_s": "ten"}),
     "timeout_s is a number of seconds"),
    ("webhook-env-empty", _file("tracking", "webhook_config", "hook.json", {"url_env": "WANFORGE_TEST_NO_SUCH_VAR"}),
     "WANFORGE_TEST_NO_SUCH_VAR is empty"),
    ("lycoris-missing", lambda cfg, files: cfg["lora"].update(lora_type="lycoris", lycoris_config=str(files / "l.json"))
     if "lora" in cfg else cfg.update(lora={"lora_type": "lycoris", "lycoris_config": str(files / "l.json")}),
     "lora.lycoris_config:"),
    ("lycoris-bad-algo", lambda cfg, files: cfg.update(lora={"lora_type": "lycoris", "lycoris_config": _json(
        files / "l.json", {"algo": "lokrr"})}), 'algo "lokrr" is not a LyCORIS algorithm: did you mean "lokr"?'),
    ("lycoris-key-typo", lambda cfg, files: cfg.update(lora={"lora_type": "lycoris", "lycoris_config": _json(
        files / "l.json", {"algo": "lokr", "linear_dimm": 8})}), 'unknown key "linear_dimm"'),
    ("lycoris-bad-json", lambda cfg, files: cfg.update(lora={"lora_type": "lycoris", "lycoris_config": _json(
        files / "l.json", "{algo: lokr}")}), "is not valid JSON"),
    ("lycoris-factor", lambda cfg, files: cfg.update(lora={"lora_type": "lycoris", "lycoris_config": _json(
        files / "l.json", {"algo": "lokr", "factor": 0})}), "factor = 0 must be a whole number"),
    ("crepa-encoder-missing", lambda cfg, files: cfg.update(crepa={"enabled": True, "encoder_path": str(files / "dino")}),
     "crepa.encoder_path:"),
    ("crepa-encoder-empty-folder", lambda cfg, files: cfg.update(crepa={"enabled": True, "encoder_path": str(files)}),
     "neither a dinov2 repo clone"),
    ("metadata-missing", _ds(caption_strategy="metadata"), "datasets[0].metadata_file:"),
    ("metadata-named-missing", _ds(caption_strategy="metadata", metadata_file="captions.csv"), "captions.csv does not exist"),
    ("dataset-missing", lambda cfg, files: cfg["datasets"][0].update(path=str(files / "clips")), "datasets[0].path:"),
    ("dataset-is-a-file", lambda cfg, files: cfg["datasets"][0].update(path=_json(files / "clip.mp4", "x")),
     "datasets[0].path: "),
    ("cache-dir-is-a-file", lambda cfg, files: cfg["datasets"][0].update(cache_dir=_json(files / "cache", "x")),
     "datasets[0].cache_dir:"),
    ("hf-repo-id", _ds(hf_repo="user/bad name"), "datasets[0].hf_repo"),
    ("model-path-missing", _set("model", pretrained_model_name_or_path="/nowhere/wan"), "model.pretrained_model_name_or_path"),
    ("model-path-not-diffusers", lambda cfg, files: cfg["model"].update(pretrained_model_name_or_path=str(files)),
     "has no transformer/config.json"),
    ("model-path-a-file", lambda cfg, files: cfg["model"].update(pretrained_model_name_or_path=_json(files / "w.safetensors", "x")),
     "is a file: give the pipeline folder"),
    ("transformer-file-missing", _set("model", pretrained_transformer_model_name_or_path="./ft.safetensors"),
     "model.pretrained_transformer_model_name_or_path"),
    ("vae-path-missing", _set("model", pretrained_vae_model_name_or_path="~/no/such/vae.safetensors"),
     "model.pretrained_vae_model_name_or_path"),
    ("model-original-layout", _set("model", pretrained_model_name_or_path="Wan-AI/Wan2.1-T2V-1.3B"),
     "try Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    ("model-other-task", lambda cfg, files: cfg["model"].update(flavour="tiny-i2v-2.1", pretrained_model_name_or_path=str(
        _tiny_t2v())), 'model.flavour = "tiny-i2v-2.1" expects a transformer with 36 input channels'),
    ("metadata-no-caption-column", lambda cfg, files: cfg["datasets"][0].update(
        path=str(_metadata_dataset(files)), caption_strategy="metadata"), "set datasets[0].caption_column to one of"),
    ("model-hub-id-invalid", _set("model", pretrained_model_name_or_path="wan ai/model"), "is neither a folder here nor a Hub repo id"),
    ("output-dir-a-file", lambda cfg, files: cfg["train"].update(output_dir=_json(files / "run", "x")), "train.output_dir:"),
    ("resume-bogus", _sets(), None),  # replaced in the test: check --resume with a folder that is no checkpoint
    # ---- names the model must have
    ("target-typo", _set("lora", target_modules=["to_qq"]), 'lora.target_modules: "to_qq" matches no module'),
    ("target-attention-block", _set("lora", target_modules=["attn1"]), '"attn1" selects WanAttention modules'),
    ("target-norm", _set("lora", target_modules=["norm1"]), '"norm1" selects FP32LayerNorm'),
    ("target-image-on-t2v", _set("lora", target_modules=["add_k_proj"]), '"add_k_proj" matches no module'),
    ("target-rmsnorm", _set("lora", target_modules=["norm_q"]), '"norm_q" selects RMSNorm'),
    ("target-not-interchange", _set("lora", target_modules=["patch_embedding"]), "cannot be saved in a LoRA file"),
    ("skip-layers-range", _set("validation", skip_layers=[5]), "validation.skip_layers: [5] out of range"),
    ("skip-layers-negative", _set("validation", skip_layers=[-1]), "skip_layers are block indices"),
    ("tread-range", _set("tread", routes=[{"selection_ratio": 0.1, "start_layer_idx": 0, "end_layer_idx": 5}]),
     "tread.routes[0]: layers 0..5 are outside"),
    ("tread-reversed", _set("tread", routes=[{"selection_ratio": 0.1, "start_layer_idx": 1, "end_layer_idx": 0}]),
     "tread.routes[0]: start_layer_idx 1 resolves after"),
    ("tread-overlap", _set("tread", routes=[{"selection_ratio": 0.1, "start_layer_idx": 0, "end_layer_idx": 1},
                                            {"selection_ratio": 0.1, "start_layer_idx": 1, "end_layer_idx": 1}]),
     "overlap"),
    ("crepa-block", _set("crepa", enabled=True, block_index=5, encoder_path=None), "crepa.block_index = 5"),
    ("attention-typo", _set("memory", attention_backend="natve"), 'memory.attention_backend: unknown backend "natve"'),
    ("streamed-more-than-blocks", _set("memory", streamed_blocks=5),
     "memory.streamed_blocks = 5: tiny has 2 transformer blocks: try 2"),
    ("streamed-more-than-checkpointed", _set("memory", streamed_blocks=2, checkpointed_blocks=1),
     "only checkpointed blocks stream"),
    ("streamed-without-checkpointing", _set("memory", streamed_blocks=1, gradient_checkpointing="none"),
     "streamed_blocks needs gradient_checkpointing"),
    ("streamed-fp8", _set("memory", preset="low-16gb", base_quantization="fp8"),
     'memory.preset = "low-16gb" (it streams the weights of 38 blocks): fp8 base weights do not stream'),
    ("streamed-both-experts", lambda cfg, files: cfg["model"].update(flavour="tiny-t2v-2.2-high", train_both_experts=True)
     or cfg.update(memory={"streamed_blocks": 1}), "memory.streamed_blocks: not with model.train_both_experts"),
    ("streamed-sharded", _set("memory", streamed_blocks=1, shard_base=True),
     "memory.streamed_blocks: not supported with memory.shard_base = true"),
    ("attention-not-installed", _set("memory", attention_backend="sage"), 'memory.attention_backend = "sage" is not usable here'),
    ("flow-misses-expert", lambda cfg, files: cfg["model"].update(flavour="tiny-t2v-2.2-high") or cfg.update(
        flow={"timestep_sampling": "logit_normal", "logit_mean": -8.0}), "flow: only"),
    # ---- this machine
    ("adamw8bit-here", _set("optim", optimizer="adamw8bit"), 'optim.optimizer = "adamw8bit" needs'),
    ("wandb-no-login", _set("tracking", report_to="wandb"), 'tracking.report_to = "wandb"'),
    ("hub-no-token", _set("hub", push_to_hub=True, hub_model_id="me/lora"), "hub.push_to_hub: no Hugging Face token"),
    # ---- the dataset scan
    ("batch-too-big", _set("train", train_batch_size=4), "raise datasets.repeats (datasets[0].repeats ="),
    ("all-disabled", _ds(disabled=True), "every dataset has disabled = true"),
    ("holdout-leaves-too-few", lambda cfg, files: cfg["train"].update(train_batch_size=2) or cfg["validation"].update(
        eval_holdout=True, eval_every_n_steps=1), "datasets[0].repeats ="),
    ("no-captions", _ds(caption_extension=".caption"), "datasets[0] (few_clips"),
]


@pytest.mark.parametrize("case_id, change, expected", CASES, ids=[c[0] for c in CASES])
def test_check_refuses_with_one_line_naming_the_field(case_id, change, expected, env, capsys, monkeypatch, tmp_path):
    data, out, files = env
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc W&B login
    _hub_token_absent(monkeypatch, tmp_path)
    cfg = base_config(data, out)
    sets = change(cfg, files) or []
    capsys.readouterr()  # what building a fixture printed is not check's output
    extra: list[str] = []
    if case_id == "resume-bogus":
        extra, expected = ["--resume", str(files)], "--resume"
    config = write_toml(tmp_path / "config.toml", cfg)
    code, err = run_check(capsys, config, *[a for s in sets for a in ("--set", s)], *extra)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors, err
    assert any(expected in line for line in errors), err
    assert len(err.strip().splitlines()) == len([ln for ln in err.strip().splitlines() if ln.startswith(("error: ", "warning: "))])


def test_the_base_config_is_valid(env, capsys, tmp_path):
    data, out, _ = env
    code, err = run_check(capsys, write_toml(tmp_path / "c.toml", base_config(data, out)))
    assert code == 0, err


@pytest.mark.parametrize("name, write, expected", [
    ("bad-utf8", lambda p: p.write_bytes(b'[model]\nflavour = "tiny"\n# caf\xe9\n'), "on line 3 is not UTF-8"),
    ("folder", lambda p: p.mkdir(), "is a folder, not a config file"),
    ("missing", lambda p: None, "no such config file"),
    ("bad-toml", lambda p: p.write_text('[train]\nmax_train_steps = "2\n'), "not valid TOML"),
    ("duplicate-key", lambda p: p.write_text("[train]\nseed = 1\nseed = 2\n"), "not valid TOML"),
    ("json-given", lambda p: p.write_text('{"model_family": "wan"}'), "import-simpletuner"),
    ("empty", lambda p: p.write_text(""), "no dataset: add a [[datasets]] table"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_config_file_problems(name, write, expected, capsys, tmp_path):
    path = tmp_path / ("config.json" if name == "json-given" else "config.toml")
    write(path)
    code, err = run_check(capsys, path)
    assert code == 2 and expected in err and "Traceback" not in err, err


def test_missing_config_suggests_a_close_name(capsys, tmp_path):
    (tmp_path / "config.toml").write_text("")
    code, err = run_check(capsys, tmp_path / "confg.toml")
    assert code == 2 and f"did you mean {tmp_path / 'config.toml'}?" in err


def test_byte_order_mark_is_accepted(env, capsys, tmp_path):
    data, out, _ = env
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf" + tomli_w.dumps(base_config(data, out)).encode())
    assert run_check(capsys, path)[0] == 0


def test_tilde_in_paths_is_the_home_folder(env, monkeypatch, tmp_path):
    from trainer.config.files import load_config

    data, _, _ = env
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = base_config(data, Path("x"))
    cfg["train"]["output_dir"] = "~/runs/one"
    cfg["validation"]["prompt_library"] = "~/lib.json"
    cfg["model"]["pretrained_vae_model_name_or_path"] = "~/vae"
    (tmp_path / "elsewhere").mkdir()
    loaded = load_config(write_toml(tmp_path / "elsewhere" / "c.toml", cfg))
    assert loaded.train.output_dir == tmp_path / "runs" / "one"
    assert loaded.validation.prompt_library == tmp_path / "lib.json"
    assert loaded.model.pretrained_vae_model_name_or_path == str(tmp_path / "vae")


def test_existing_checkpoints_need_resume(env, capsys, tmp_path):
    data, out, _ = env
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "wanforge_state.json").write_text("{}")
    config = write_toml(tmp_path / "c.toml", base_config(data, out))
    code, err = run_check(capsys, config)
    assert code == 2 and "already has checkpoints: pass --resume latest" in err
    assert run_check(capsys, config, "--resume", "latest")[0] == 0


@pytest.mark.parametrize("change, expected", [
    (_set("optim", learning_rate=0.05), "optim.learning_rate = 0.05 is high"),
    (_set("optim", lr_warmup_steps=100, lr_scheduler="constant_with_warmup"), "never reaches its learning rate"),
    (_ds(num_frames=10), "num_frames = 10 is not 4k+1"),
    (_ds(min_frames=20), "min_frames = 20 is above num_frames = 9"),
    (_ds(caption_dropout_probability=0.6), "most samples train without their caption"),
    (_set("model", wan_force_2_1_time_embedding=True), "is for TI2V-5B only"),
    (_ds(resolution=64), "resolution = 64 is ignored"),
    (_set("model", flavour="tiny-t2v-2.2-high", train_both_experts=True), "the other expert never trains"),
    (_set("lora", rank=1024), "lora.rank = 1024"),
    (_set("ema", use_ema=True, update_interval=50), "the EMA never updates"),
], ids=["lr-high", "warmup", "frames-rounded", "min-frames", "dropout", "ti2v-only", "resolution-ignored", "experts",
        "rank", "ema"])
def test_suspicious_values_warn_but_pass(change, expected, env, capsys, tmp_path):
    data, out, files = env
    cfg = base_config(data, out)
    change(cfg, files)
    code, err = run_check(capsys, write_toml(tmp_path / "c.toml", cfg))
    assert code == 0, err
    assert any(line.startswith("warning: ") and expected in line for line in err.splitlines()), err


# ---------------------------------------------------------------- a suggested fix is itself valid

SUGGESTIONS = [
    # (the mistake as --set, regex for the suggested value in the message, the --set that applies it)
    ("optim.learning_rate=1e6", r"did you mean ([0-9.e+-]+)\?", "optim.learning_rate={}"),
    ("lora.target_modules=['to_qq']", r'did you mean "([a-z0-9_.]+)"\?', "lora.target_modules=['{}']"),
    ("validation.skip_layers=[7]", r"try \[(\d+)\]", "validation.skip_layers=[{}]"),
    ("crepa.block_index=7", r"try (\d+)$", "crepa.block_index={}"),
    ("crepa.encoder_image_size=20", r"try (\d+) or", "crepa.encoder_image_size={}"),
    ("train.seed=-1", r"try the default, (\d+)", "train.seed={}"),
    ("optim.learning_rate=nan", r"try the default, ([0-9.e+-]+)", "optim.learning_rate={}"),
    ("datasets.0.max_frames=4", r"try max_frames = (\w+)", "datasets.0.max_frames={}"),
    ("datasets.0.caption_extension=txt", r'try "(\.[a-z]+)"', "datasets.0.caption_extension={}"),
    ("optim.optimizer=adam", r'did you mean "([a-z0-9]+)"\?', "optim.optimizer={}"),
    ("train.text_max_length=1024", r"try (\d+)", "train.text_max_length={}"),
    ("datasets.0.width=70", r"try (\d+) or", "datasets.0.width={}"),
    ("memory.attention_backend=natve", r'did you mean "([a-z_]+)"\?', "memory.attention_backend={}"),
    ("memory.streamed_blocks=9", r"try (\d+) \(every block\)", "memory.streamed_blocks={}"),
    ("datasets.0.resolution=0.5", r"did you mean (\d+),", "datasets.0.resolution={}"),
    ("datasets.0.resolution_type=area", r"did you mean ([0-9.]+),", "datasets.0.resolution={}"),
]


@pytest.mark.parametrize("mistake, pattern, apply", SUGGESTIONS, ids=[s[0] for s in SUGGESTIONS])
def test_suggested_fix_is_valid(mistake, pattern, apply, env, capsys, tmp_path):
    data, out, _ = env
    cfg = base_config(data, out)
    cfg["crepa"] = {"enabled": "crepa" in mistake, "encoder_path": str(tmp_path / "files"), "block_index": 1}
    (tmp_path / "files" / "hubconf.py").write_text("")
    if "resolution" in mistake:
        cfg["datasets"][0].update(width=None, height=None, resolution=480)
        for k in ("width", "height"):
            del cfg["datasets"][0][k]
    config = write_toml(tmp_path / "c.toml", cfg)
    code, err = run_check(capsys, config, "--set", mistake)
    assert code == 2, err
    field = mistake.split("=")[0].removeprefix("datasets.0.")
    line = next(ln for ln in err.splitlines() if ln.startswith("error: ") and field.split(".")[-1] in ln)
    suggested = re.search(pattern, line).group(1)
    code, err = run_check(capsys, config, "--set", mistake, "--set", apply.format(suggested))
    assert code == 0, f"suggested {suggested!r} from {line!r} is refused too:\n{err}"


def test_a_fix_named_as_a_field_path_applies_with_set(env, capsys, tmp_path):
    """Messages name list items as `datasets[0].repeats = N`; pasted into --set as written, that fix applies."""
    data, out, _ = env
    config = write_toml(tmp_path / "c.toml", base_config(data, out))
    code, err = run_check(capsys, config, "--set", "train.gradient_accumulation_steps=64")
    assert code == 2, err
    name, value = re.search(r"\((datasets\[0\]\.repeats) = (\d+)\)", err).groups()
    code, err = run_check(capsys, config, "--set", "train.gradient_accumulation_steps=64", "--set", f"{name}={value}")
    assert code == 0, err


# ---------------------------------------------------------------- train, launch and the form call it


def _cached(data: Path) -> list[str]:
    """Cache entries built (the scan's probe results are no cache entry)."""
    return sorted(p.name for p in (data / ".wanforge_cache").rglob("*") if p.is_file() and p.name != "probe.json")


def test_train_refuses_before_building_caches(env, capsys, tmp_path, dataset_copy):
    _, out, _ = env
    cfg = base_config(dataset_copy, out)
    cfg["lora"] = {"target_modules": ["to_qq"]}
    config = write_toml(tmp_path / "c.toml", cfg)
    check_code, check_err = run_check(capsys, config)
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert check_code == code == 2
    line = next(ln for ln in check_err.splitlines() if "to_qq" in ln)
    assert line in err.splitlines()  # the same line
    assert _cached(dataset_copy) == [] and not out.exists()


def test_cache_refuses_before_building_caches(env, capsys, tmp_path, dataset_copy):
    _, out, _ = env
    cfg = base_config(dataset_copy, out)
    cfg["validation"]["prompt"] = "a <token> moves"
    code = main(["cache", str(write_toml(tmp_path / "c.toml", cfg))])
    assert code == 2 and "validation.prompt uses <token>" in capsys.readouterr().err
    assert _cached(dataset_copy) == []


def test_launch_refuses_before_rendering(env, capsys, tmp_path, monkeypatch):
    data, out, _ = env
    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "state"))
    cfg = base_config(data, out)
    cfg["validation"]["skip_layers"] = [9]
    code = main(["launch", str(write_toml(tmp_path / "c.toml", cfg)), "--target", "local", "--dryrun"])
    assert code == 2 and "validation.skip_layers: [9] out of range" in capsys.readouterr().err
    assert not list(tmp_path.glob("state/**/task.yaml"))


def test_form_check_lists_preflight_problems(env, tmp_path):
    from launcher.form.config_form import ConfigForm
    from trainer.config.files import config_from_dict

    data, out, _ = env
    cfg = base_config(data, out)
    cfg["lora"] = {"target_modules": ["to_qq"]}
    cfg["validation"]["prompt_library"] = str(tmp_path / "missing.json")
    problems = ConfigForm(config_from_dict(cfg)).check()
    assert any("to_qq" in p for p in problems) and any("prompt_library" in p for p in problems)


# ---------------------------------------------------------------- the static facts match the libraries


@pytest.mark.parametrize("flavour", ["t2v-480p-1.3b-2.1", "i2v-480p-14b-2.1", "t2v-14b-2.2-high", "ti2v-5b-2.2"])
def test_wan_layout_matches_diffusers(flavour):
    import torch
    from diffusers import WanTransformer3DModel

    from trainer.flavours import FLAVOURS

    f = FLAVOURS[flavour]
    kwargs = dict(in_channels=f.in_channels, out_channels=f.latent_channels, num_layers=2)
    if f.image_encoder:
        kwargs.update(image_dim=1280, added_kv_proj_dim=f.dim)
    with torch.device("meta"):
        model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, **kwargs)
    real = {name: type(m).__name__ for name, m in model.named_modules() if name}
    assert module_layout(f, 2) == real


def test_attention_backend_names_are_diffusers_own():
    from diffusers.models.attention_dispatch import AttentionBackendName

    from trainer.preflight.model import attention_backend_names

    assert attention_backend_names() == [b.value for b in AttentionBackendName]


def test_lycoris_algorithms_are_lycoris_own():
    from lycoris.wrapper import network_module_dict

    from trainer.preflight.files import LYCORIS_ALGOS

    assert set(LYCORIS_ALGOS) == set(network_module_dict)


def test_preflight_imports_no_torch():
    code = "import sys, trainer.preflight, launcher.launch; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.strip() == "False False"
