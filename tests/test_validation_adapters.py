"""Extra LoRAs on validation renders (a speed LoRA at 4 steps beside the full render): every file format users have loads
fully through diffusers' loader, per Wan 2.2 expert, on top of the run's LoRA and off again; `check` names the keys that
would not apply; each video names the settings it was rendered with."""

import json
import logging

import av
import numpy as np
import pytest
import torch

from conftest import tiny_config
from launcher.cli import main as cli
from lora_files import FORMATS, make_lora, peft_deltas, write_lora
from trainer.config.files import config_from_dict, save_config
from trainer.config.model import LoraConfig, ModelConfig
from trainer.config.outputs import HubFile, parse_hub_file
from trainer.errors import UserError
from trainer.model.adapter_keys import analyse_header, read_alphas, read_header
from trainer.model.components import load_transformer, load_vae
from trainer.model.lora import add_lora
from trainer.model.wan_layout import linear_shapes
from trainer.outputs.validation_adapters import linear_shapes_of, stacked_adapters
from trainer.outputs.validation_round import MANIFEST, sheet_label, validation_round
from trainer.outputs.validation_videos import (AdapterSpec, RenderSpec, ValidationPrompt, ValidationSettings,
                                               build_pipeline, settings_for)
from trainer.preflight.check import preflight

CPU = torch.device("cpu")


def _parts(flavour: str, subfolder: str | None = None):
    model = ModelConfig(flavour=flavour)
    return load_transformer(model, subfolder=subfolder), load_vae(model)


@pytest.fixture(scope="module")
def tiny():
    return _parts("tiny")


def _settings(*adapters: AdapterSpec, steps=2, guidance=1.0, render="speed", lora_strength=1.0, renders=()):
    return ValidationSettings((ValidationPrompt("p", "p"),), "n", 5, 32, 32, guidance, "unipc", 3.0, steps, 0, 16,
                              adapters=adapters, render=render, lora_strength=lora_strength, renders=renders)


def _report(path, shapes):
    header = read_header(path)
    return analyse_header(header, read_alphas(path, header), shapes)


def test_linear_shapes_match_the_real_class():
    """The torch-free table `check` compares LoRA shapes with, against diffusers' class at distinct sizes."""
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16,
                  text_dim=24, freq_dim=12, ffn_dim=40, num_layers=2, image_dim=20, added_kv_proj_dim=20)
    for image in (True, False):
        c = config if image else {**config, "image_dim": None, "added_kv_proj_dim": None, "in_channels": 16}
        model = WanTransformer3DModel(**c)
        assert linear_shapes(dict(model.config)) == linear_shapes_of(model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_fully_at_its_strength_and_comes_off(fmt, tiny, tmp_path):
    transformer, vae = tiny
    add_lora(transformer, LoraConfig(rank=4, target_modules=["to_q", "to_k"]))  # the run's own LoRA, as in training
    try:
        shapes = linear_shapes_of(transformer)
        tensors, deltas = make_lora(shapes, fmt)
        path = write_lora(tmp_path / f"{fmt}.safetensors", tensors)
        report = _report(path, shapes)
        assert not report.errors and not report.not_applied and report.modules == len(deltas)
        before = {k: v.clone() for k, v in transformer.state_dict().items()}
        grads = {n: p.requires_grad for n, p in transformer.named_parameters()}
        settings = _settings(AdapterSpec(str(path), 0.5), lora_strength=0.25)
        with stacked_adapters(build_pipeline(transformer, vae, settings), settings):
            got = peft_deltas(transformer, "wanforge_speed_0")
            assert set(got) == set(deltas)  # every key landed on its layer, none elsewhere
            for module, delta in deltas.items():
                torch.testing.assert_close(got[module], 0.5 * delta, rtol=1e-5, atol=1e-6)
            run_scale = transformer.blocks[0].attn1.to_q.scaling["default"]
            assert run_scale == pytest.approx(0.25)  # the run's LoRA stays on, at the render's strength
            assert transformer.blocks[0].attn1.to_q.active_adapters == ["default", "wanforge_speed_0"]
        # off again: the same modules, tensors, scales and trainable parameters as before
        assert transformer.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
        assert {n: p.requires_grad for n, p in transformer.named_parameters()} == grads
        assert transformer.blocks[0].attn1.to_q.scaling == {"default": 1.0}
        assert type(transformer.blocks[0].ffn.net[2]) is torch.nn.Linear and list(transformer.peft_config) == ["default"]
    finally:
        transformer.delete_adapters(["default"])
        for name, module in list(transformer.named_modules()):  # unwrap for the next parameter
            if hasattr(module, "get_base_layer") and name:
                parent, _, child = name.rpartition(".")
                setattr(transformer.get_submodule(parent) if parent else transformer, child, module.get_base_layer())


def test_a_wan21_i2v_lora_on_a_wan22_expert_names_the_keys_that_do_not_apply(clips, tmp_path, caplog):
    """The field's mistake: a Wan 2.1 image-to-video speed LoRA (k_img / v_img) on a Wan 2.2 expert. `check` names the
    keys and why, the rest loads, nothing loads silently half."""
    i2v, _ = _parts("tiny-i2v-2.1")
    tensors, deltas = make_lora(linear_shapes_of(i2v), "comfyui")
    assert any("k_img" in k for k in tensors)
    lora = write_lora(tmp_path / "wan21_i2v_speed.safetensors", tensors)
    cfg = tiny_config(clips, tmp_path / "run", model={"flavour": "tiny-t2v-2.2-high"},
                      validation={"renders": [{"name": "speed", "num_inference_steps": 2, "guidance_scale": 1.0,
                                               "adapters": [{"path": str(lora), "expert": "high"}]}]})
    report = preflight(cfg, scan=False)
    assert not report.errors
    (line,) = [w for w in report.warnings if "would not apply" in w]
    assert line.startswith("validation.renders[0].adapters[0].path: ")
    assert "blocks.0-1.cross_attn.k_img" in line and "blocks.0-1.cross_attn.v_img" in line and "(4 layers)" in line
    # on the Wan 2.1 I2V model itself every key applies
    assert not _report(lora, linear_shapes_of(i2v)).not_applied
    # rendering loads the rest on the expert and logs the same keys once
    expert, vae = _parts("tiny-t2v-2.2-high")
    settings = _settings(AdapterSpec(str(lora), 1.0, "high"))
    pipe = build_pipeline(expert, vae, settings, cfg)
    with caplog.at_level(logging.WARNING), stacked_adapters(pipe, settings):
        got = peft_deltas(expert, "wanforge_speed_0")
        assert set(got) == {m for m in deltas if "add_" not in m}
    assert "cross_attn.k_img" in caplog.text


def test_a_text_to_video_lora_on_the_wan21_i2v_model_loads_whole(tmp_path):
    """The other way round: diffusers gives a T2V LoRA zero image layers on Wan 2.1 I2V; every key of the file lands."""
    i2v, vae = _parts("tiny-i2v-2.1")
    t2v_shapes = {m: s for m, s in linear_shapes_of(i2v).items() if "add_" not in m}
    tensors, deltas = make_lora(t2v_shapes, "kohya")
    lora = write_lora(tmp_path / "t2v.safetensors", tensors)
    settings = _settings(AdapterSpec(str(lora)))
    with stacked_adapters(build_pipeline(i2v, vae, settings), settings):
        got = peft_deltas(i2v, "wanforge_speed_0")
        assert all(torch.allclose(got[m], deltas[m], atol=1e-6) for m in deltas)
        assert all(not got[m].any() for m in set(got) - set(deltas))  # the zero image layers diffusers adds


def test_check_refuses_files_that_would_not_load(clips, tmp_path):
    tiny_shapes = linear_shapes_of(_parts("tiny")[0])
    wide = {m: (a * 2, b * 2) for m, (a, b) in tiny_shapes.items()}  # a LoRA for a bigger Wan
    written = {
        "wide": write_lora(tmp_path / "wide.safetensors", make_lora(wide, "comfyui")[0]),
        "unknown": write_lora(tmp_path / "unknown.safetensors", {"foo.bar.lora_A.weight": torch.zeros(2, 3)}),
        "lokr": write_lora(tmp_path / "lokr.safetensors", {"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.zeros(2, 2),
                                                           "lora_unet_blocks_0_self_attn_q.lokr_w2": torch.zeros(2, 2)}),
        "deep": write_lora(tmp_path / "deep.safetensors", make_lora(
            {**tiny_shapes, "blocks.7.attn1.to_q": (32, 32)}, "comfyui", modules=["blocks.7.attn1.to_q"])[0]),
    }
    assert all(p.is_file() for p in written.values())
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle under the wrong name
    with_diff = make_lora(tiny_shapes, "comfyui")[0] | {"diffusion_model.blocks.0.norm3.diff": torch.zeros(32)}
    write_lora(tmp_path / "diffs.safetensors", with_diff)

    def problems(name, **adapter):
        cfg = tiny_config(clips, tmp_path / "run", validation={"renders": [
            {"name": "speed", "adapters": [{"path": str(tmp_path / f"{name}.safetensors"), **adapter}]}]})
        report = preflight(cfg, scan=False)
        return report.errors, [w for w in report.warnings if "renders" in w]

    errors, _ = problems("wide")
    assert len(errors) == 1 and "sized for another model" in errors[0] and "blocks.0.attn1.to_q" in errors[0]
    assert "has no key diffusers' Wan LoRA loader recognises" in problems("unknown")[0][0]
    assert "LoKr / LoHa" in problems("lokr")[0][0]
    errors, _ = problems("deep")
    assert "none of its keys applies" in errors[0] and "blocks.7.self_attn.q" in errors[0] and "blocks 0-1" in errors[0]
    assert "not a .safetensors file" in problems("pickle")[0][0]
    assert "is not a file" in problems("missing")[0][0]
    errors, warnings = problems("diffs")
    assert not errors and "norm3.diff" in warnings[0] and "ignores them" in warnings[0]
    errors, _ = problems("diffs", expert="low")
    assert 'only Wan 2.2 A14B has experts' in errors[0] and 'expert = "both"' in errors[0]


def test_per_expert_adapters_land_on_their_expert(clips, tmp_path):
    cfg = tiny_config(clips, tmp_path / "run", model={"flavour": "tiny-t2v-2.2-high",
                                                      "wan_validation_load_other_stage": True})
    high, vae = _parts("tiny-t2v-2.2-high")
    add_lora(high, LoraConfig(rank=4))  # the trained high-noise expert
    shapes = linear_shapes_of(high)
    files = {}
    for name, seed in (("high", 1), ("low", 2), ("both", 3)):
        tensors, deltas = make_lora(shapes, "kohya", seed=seed)
        files[name] = (write_lora(tmp_path / f"{name}.safetensors", tensors), deltas)
    settings = _settings(*(AdapterSpec(str(files[e][0]), 1.0, e) for e in ("high", "low", "both")))
    pipe = build_pipeline(high, vae, settings, cfg)
    low = pipe.transformer_2
    assert pipe.wanforge_experts == {"high": high, "low": low}
    with stacked_adapters(pipe, settings):
        assert set(high.peft_config) == {"default", "wanforge_speed_0", "wanforge_speed_2"}
        assert set(low.peft_config) == {"wanforge_speed_1", "wanforge_speed_2"}
        for model, index, expert in ((high, 0, "high"), (low, 1, "low"), (high, 2, "both"), (low, 2, "both")):
            got = peft_deltas(model, f"wanforge_speed_{index}")
            assert set(got) == set(files[expert][1])
            assert all(torch.allclose(got[m], files[expert][1][m], atol=1e-6) for m in got)
    assert list(high.peft_config) == ["default"] and not hasattr(low, "peft_config")


def test_renders_use_their_own_settings_and_name_them(tiny, tmp_path):
    """Full steps with CFG, then the speed render at 2 steps, CFG 1 with its adapter: counted by the transformer's
    forward passes; the files, videos.json, the mp4 comment and the contact sheet rows say which is which."""
    transformer, vae = tiny
    lora = write_lora(tmp_path / "speed.safetensors", make_lora(linear_shapes_of(transformer), "comfyui")[0])
    renders = (RenderSpec("full"), RenderSpec("speed", steps=2, guidance_scale=1.0, flow_shift=5.0,
                                              scheduler="flow_match_euler", adapters=(AdapterSpec(str(lora), 0.7),)))
    settings = _settings(steps=3, guidance=5.0, render="", renders=renders)
    calls = []
    hook = transformer.register_forward_pre_hook(lambda module, args: calls.append(
        len(getattr(module.blocks[0].attn1.to_q, "lora_A", {}))))
    g = torch.Generator().manual_seed(0)
    embeds = {"p": torch.randn(7, 32, generator=g), "n": torch.randn(5, 32, generator=g)}
    try:
        result = validation_round(build_pipeline(transformer, vae, settings), settings, embeds, tmp_path / "out", CPU,
                                  None, [("", torch.no_grad())])
    finally:
        hook.remove()
    assert calls == [0] * 6 + [1] * 2  # 3 steps x (cond + uncond), then 2 steps x cond only with the adapter on
    assert [p.name for p in result.paths] == ["p-full.mp4", "p-speed.mp4"]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["p-full.mp4"] | {} == manifest["p-full.mp4"]
    full, speed = manifest["p-full.mp4"], manifest["p-speed.mp4"]
    assert (full["steps"], full["guidance_scale"], full["scheduler"], full["adapters"]) == (3, 5.0, "unipc", [])
    assert (speed["steps"], speed["guidance_scale"], speed["flow_shift"], speed["scheduler"]) == (2, 1.0, 5.0,
                                                                                                 "flow_match_euler")
    assert speed["adapters"] == [{"path": str(lora), "strength": 0.7, "expert": "both"}] and speed["render"] == "speed"
    with av.open(str(result.paths[1])) as container:
        assert json.loads(container.metadata["comment"])["steps"] == 2
    assert sheet_label(result.videos[1]) == "p | speed: 2 steps, CFG 1, shift 5, flow_match_euler, +speed@0.7"
    assert not np.array_equal(result.videos[0].frames, result.videos[1].frames)


def test_a_render_guidance_reaches_the_low_noise_expert(clips, tmp_path):
    cfg = tiny_config(clips, tmp_path / "run", model={"flavour": "tiny-t2v-2.2-low"}, validation={
        "renders": [{"name": "full"}, {"name": "speed", "num_inference_steps": 4, "guidance_scale": 1.0},
                    {"name": "mixed", "guidance_scale": 2.0, "guidance_scale_low": 1.5}]})
    full, speed, mixed = settings_for(cfg, "x").each_render()
    assert (full.guidance_scale, full.guidance_scale_low, full.steps) == (4.0, 3.0, 10)  # the flavour's, the config's
    assert (speed.guidance_scale, speed.guidance_scale_low, speed.steps) == (1.0, 1.0, 4)
    assert (mixed.guidance_scale, mixed.guidance_scale_low) == (2.0, 1.5)


def test_hub_paths_parse_and_refuse_what_is_not_a_file():
    assert parse_hub_file("hf://owner/repo/sub/speed.safetensors") == HubFile("owner/repo", "sub/speed.safetensors")
    assert parse_hub_file("hf://owner/repo@v1.0/speed.safetensors") == HubFile("owner/repo", "speed.safetensors", "v1.0")
    assert str(parse_hub_file("hf://owner/repo@main/a/b.safetensors")) == "hf://owner/repo@main/a/b.safetensors"
    for bad, why in (("hf://owner/speed.safetensors", "owner/repo/file"), ("hf://own er/repo/x.safetensors", "repo id"),
                     ("hf://owner/repo/x.bin", ".safetensors files only"), ("hf://owner/repo/../x.safetensors", ".."),
                     ("hf://owner/repo@a@b/x.safetensors", "repo id")):
        with pytest.raises(UserError, match=why):
            config_from_dict({"datasets": [{"path": "/tmp"}],
                              "validation": {"renders": [{"name": "s", "adapters": [{"path": bad}]}]}})


def test_a_hub_adapter_is_fetched_once_and_checked(online_hub, clips, tmp_path):
    shapes = linear_shapes_of(_parts("tiny")[0])
    lora = write_lora(tmp_path / "speed.safetensors", make_lora(shapes, "diffusers")[0])
    online_hub.files["owner/speed"] = {"loras/speed.safetensors": lora.read_bytes()}
    cfg = tiny_config(clips, tmp_path / "run", validation={"renders": [
        {"name": "speed", "adapters": [{"path": "hf://owner/speed/loras/speed.safetensors"}]},
        {"name": "gone", "adapters": [{"path": "hf://owner/speed/loras/missing.safetensors"}]}]})
    report = preflight(cfg, scan=False)
    assert [e for e in report.errors if "renders" in e] == [
        "validation.renders[1].adapters[0].path: hf://owner/speed/loras/missing.safetensors: owner/speed has no file "
        "loras/missing.safetensors"]
    assert not [w for w in report.warnings if "renders[0]" in w]  # its header was read from the Hub and all applies
    from trainer.outputs.validation_adapters import adapter_file

    local = adapter_file("hf://owner/speed/loras/speed.safetensors")
    assert local.read_bytes() == lora.read_bytes()
    with pytest.raises(UserError, match="has no file loras/missing.safetensors"):
        adapter_file("hf://owner/speed/loras/missing.safetensors")


@pytest.fixture
def online_hub(monkeypatch):
    import huggingface_hub.constants as constants
    from hub_server import FakeHub

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import, both
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield hub


def test_validate_command_takes_adapters_and_render_flags(clips, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from trainer.outputs.export import save_lora

    cfg = tiny_config(clips, tmp_path / "run", validation={"prompt": "a square", "num_frames": 5, "width": 32,
                                                           "height": 32, "num_inference_steps": 2})
    transformer = load_transformer(cfg.model)
    add_lora(transformer, cfg.lora)
    run_lora = save_lora(get_peft_model_state_dict(transformer), tmp_path / "lora", rank=cfg.lora.rank,
                         alpha=cfg.lora.effective_alpha)
    speed = write_lora(tmp_path / "speed.safetensors", make_lora(linear_shapes_of(transformer), "kohya")[0])
    config = tmp_path / "config.toml"
    save_config(cfg, config)
    out = tmp_path / "out"
    assert cli(["validate", str(config), "--lora", str(run_lora), "--out", str(out), "--adapter",
                f"{speed},strength=0.5", "--steps", "1", "--guidance-scale", "1"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert list(manifest) == ["a-square-cli.mp4"]
    assert manifest["a-square-cli.mp4"]["steps"] == 1 and manifest["a-square-cli.mp4"]["adapters"][0]["strength"] == 0.5
    assert cli(["validate", str(config), "--lora", str(run_lora), "--adapter", f"{speed},strenght=1"]) == 2
    assert cli(["validate", str(config), "--lora", str(run_lora), "--adapter", str(tmp_path / "nope.safetensors")]) == 2


def test_training_renders_both_ways_and_the_speed_render_leaves_training_alone(few_clips, tmp_path):
    """A run validating with a full render and a speed-LoRA render trains the same LoRA as one with the full render
    only (the stacked adapter comes off the live model), and run.json / metrics.jsonl name each video's settings."""
    from trainer.loop.train import train

    speed = write_lora(tmp_path / "speed.safetensors", make_lora(linear_shapes_of(_parts("tiny")[0]), "comfyui")[0])
    common = {"num_frames": 5, "width": 32, "height": 32, "num_inference_steps": 2, "every_n_steps": 1,
              "eval_every_n_steps": 0, "prompt": "a square"}
    runs = {}
    for name, renders in (("plain", [{"name": "full"}]),
                          ("speed", [{"name": "full"}, {"name": "speed", "num_inference_steps": 1,
                                                        "guidance_scale": 1.0, "adapters": [{"path": str(speed)}]}])):
        cfg = tiny_config(few_clips, tmp_path / name, train={"max_train_steps": 2}, validation={**common, "renders": renders},
                          checkpoint={"every_n_steps": 2})
        runs[name] = train(cfg, show_progress=False)
    from safetensors.torch import load_file

    plain, fast = (load_file(str(runs[n].lora_file)) for n in ("plain", "speed"))
    assert plain.keys() == fast.keys() and all(torch.equal(plain[k], fast[k]) for k in plain)
    run_json = json.loads((runs["speed"].run_dir / "run.json").read_text())
    assert sorted(run_json["video_settings"]) == sorted(run_json["videos"]) == [
        f"validation/step-{s}/a-square-{r}.mp4" for s in (1, 2) for r in ("full", "speed")]
    speed_video = run_json["video_settings"]["validation/step-2/a-square-speed.mp4"]
    assert (speed_video["steps"], speed_video["guidance_scale"], speed_video["adapters"][0]["path"]) == (1, 1.0, str(speed))
    records = [json.loads(line) for line in (runs["speed"].run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "validation_settings" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert logged[0]["validation_settings"]["validation/step-1/a-square-full.mp4"]["steps"] == 2


def test_the_low_noise_guidance_of_a_render_reaches_the_pipeline(clips, tmp_path):
    from dataclasses import replace

    from trainer.outputs.validation_videos import generate

    cfg = tiny_config(clips, tmp_path / "run", model={"flavour": "tiny-t2v-2.2-high",
                                                      "wan_validation_load_other_stage": True})
    high, vae = _parts("tiny-t2v-2.2-high")
    base = _settings(steps=4, guidance=2.0, render="")
    pipe = build_pipeline(high, vae, base, cfg)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(7, 32, generator=g), torch.randn(5, 32, generator=g)

    def last_latents(settings):
        seen = []
        generate(pipe, settings, prompt, negative, CPU, callback=lambda p, i, t, kw: seen.append(kw["latents"]) or kw)
        return seen

    a = last_latents(replace(base, guidance_scale_low=1.0))
    b = last_latents(replace(base, guidance_scale_low=3.0))
    first_low = next(i for i, t in enumerate(pipe.scheduler.timesteps) if t < 0.875 * 1000)
    assert all(torch.equal(x, y) for x, y in zip(a[:first_low], b[:first_low]))  # the high expert's steps: the same
    assert not torch.equal(a[-1], b[-1])  # the low expert's steps follow guidance_scale_low
