"""Validation rendering on the tiny Wan: mp4s, schedulers and their shift, skip-layer guidance's window, prompts."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from launcher.cli import main as cli
from trainer.config.files import config_from_dict, save_config
from trainer.data.video import decode_frames
from trainer.errors import UserError
from trainer.model.components import load_transformer, load_vae
from trainer.model.lora import add_lora
from trainer.outputs.contact_sheet import LABEL_HEIGHT, contact_sheet, frame_indices
from trainer.outputs.export import save_lora
from trainer.outputs.skip_layers import SkipLayerGuidance
from trainer.outputs.validation_videos import (
    ValidationPrompt, ValidationSettings, build_pipeline, generate, make_scheduler, settings_for, validation_prompts,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_parts():
    from trainer.config.model import ModelConfig

    model = ModelConfig(flavour="tiny")
    return load_transformer(model), load_vae(model)


def _settings(slg=None, scheduler="unipc", steps=4, guidance=5.0):
    return ValidationSettings((ValidationPrompt("p", "p"),), "n", 5, 32, 32, guidance, scheduler, 3.0, steps, 0, 16, slg)


def _latents_per_step(parts, settings):
    transformer, vae = parts
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(7, 32, generator=g), torch.randn(5, 32, generator=g)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    generate(build_pipeline(transformer, vae, settings), settings, prompt, negative, CPU, callback=record)
    return seen


def test_skip_layer_guidance_changes_the_output_only_inside_its_window(tiny_parts):
    plain = _latents_per_step(tiny_parts, _settings())
    assert len(plain) == 4

    def same_steps(slg):
        latents = _latents_per_step(tiny_parts, _settings(slg))
        return [torch.equal(a, b) for a, b in zip(plain, latents)]

    # steps 0..3 sit at fractions 0, .25, .5, .75: [0.5, 0.75) holds step 2 only; later steps inherit its change
    assert same_steps(SkipLayerGuidance((1,), 0.5, 0.75, 3.0)) == [True, True, False, False]
    # the window counts from the first (noisiest) step, not from the end
    assert same_steps(SkipLayerGuidance((0,), 0.0, 0.25, 3.0)) == [False, False, False, False]
    assert same_steps(SkipLayerGuidance((0, 1), 0.8, 1.0, 3.0)) == [True] * 4  # no step inside
    assert same_steps(SkipLayerGuidance((1,), 0.0, 1.0, 0.0)) == [True] * 4  # scale 0 is off
    # the hook is gone afterwards: a plain render is unchanged
    assert all(torch.equal(a, b) for a, b in zip(plain, _latents_per_step(tiny_parts, _settings())))


def test_skip_layer_guidance_matches_the_guider_formula(tiny_parts):
    """One step by hand: uncond + g*(cond - uncond) + s*(cond - cond_skipped), as diffusers' SkipLayerGuidance."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip
    from diffusers.hooks.hooks import HookRegistry
    from diffusers.hooks.layer_skip import _LAYER_SKIP_HOOK

    transformer, vae = tiny_parts
    g, s = 5.0, 2.0
    settings = _settings(SkipLayerGuidance((1,), 0.0, 1.0, s), steps=1, guidance=g)
    gen = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(7, 32, generator=gen), torch.randn(5, 32, generator=gen)
    captured = {}

    def record(pipe, i, t, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return kwargs

    pipe = build_pipeline(transformer, vae, settings)
    generate(pipe, settings, prompt, negative, CPU, callback=record)

    from trainer.outputs.validation_videos import PIPELINE_TEXT_LENGTH, pad_text

    shape = (1, 16, 2, 4, 4)
    latents = pipe.prepare_latents(1, 16, 32, 32, 5, torch.float32, CPU, torch.Generator().manual_seed(0))
    assert latents.shape == shape
    scheduler = make_scheduler("unipc", 3.0)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0].expand(1)
    cond_text, uncond_text = pad_text([prompt], PIPELINE_TEXT_LENGTH), pad_text([negative], PIPELINE_TEXT_LENGTH)
    with torch.no_grad():
        cond = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=cond_text, return_dict=False)[0]
        uncond = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=uncond_text, return_dict=False)[0]
        apply_layer_skip(transformer, LayerSkipConfig(indices=[1], fqn="blocks"))
        try:
            skipped = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=cond_text, return_dict=False)[0]
        finally:
            HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(_LAYER_SKIP_HOOK, recurse=True)
    assert not torch.allclose(cond, skipped)
    expected = scheduler.step(uncond + g * (cond - uncond) + s * (cond - skipped), scheduler.timesteps[0], latents,
                              return_dict=False)[0]
    torch.testing.assert_close(captured["latents"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["unipc", "flow_match_euler"])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_schedulers_apply_the_flow_shift(kind, shift):
    """Both samplers run an evenly spaced schedule through s' = shift*s / (1 + (shift-1)*s), noisiest first."""
    scheduler = make_scheduler(kind, shift)
    scheduler.set_timesteps(10)
    shifted = scheduler.sigmas[:10].double()
    even = shifted / (shift - (shift - 1) * shifted)  # the inverse of the shift
    assert even[0] == pytest.approx(1.0, abs=1e-5)
    steps = even[:-1] - even[1:]
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps.mean())), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.double(), shifted * 1000, rtol=0, atol=1.0)  # UniPC rounds down


def test_schedulers_give_different_videos(tiny_parts):
    unipc = _latents_per_step(tiny_parts, _settings(scheduler="unipc"))
    euler = _latents_per_step(tiny_parts, _settings(scheduler="flow_match_euler"))
    assert not torch.allclose(unipc[-1], euler[-1])


def test_prompt_library_names_prompts_and_fills_the_token(clips, tmp_path):
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"Red Box": "a <token> red square", "plain": "a blue circle"}))
    cfg = tiny_config(clips, tmp_path / "run", validation={"prompt_library": str(library), "instance_prompt": "sks"})
    prompts = validation_prompts(cfg, "first caption")
    assert [(p.name, p.text) for p in prompts] == [("red-box", "a sks red square"), ("plain", "a blue circle")]
    cfg = tiny_config(clips, tmp_path / "run", validation={"prompt": "<token> alone", "instance_prompt": "sks",
                                                           "prompt_library": str(library)})
    assert [p.text for p in validation_prompts(cfg, None)] == ["sks alone", "a sks red square", "a blue circle"]
    assert [p.text for p in validation_prompts(tiny_config(clips, tmp_path / "r"), "first caption")] == ["first caption"]
    with pytest.raises(UserError, match="instance_prompt"):
        validation_prompts(tiny_config(clips, tmp_path / "run", validation={"prompt_library": str(library)}), None)
    library.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        validation_prompts(tiny_config(clips, tmp_path / "run", validation={"prompt_library": str(library)}), None)


def test_resolution_wan_was_not_trained_at_warns(tmp_path, caplog):
    def cfg(**validation):
        return config_from_dict({"datasets": [{"path": str(tmp_path)}], "validation": validation})

    with caplog.at_level(logging.WARNING, logger="trainer.outputs.validation_videos"):
        settings_for(cfg(), "x")
        settings_for(cfg(width=480, height=832), "x")  # portrait 480p is fine
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="trainer.outputs.validation_videos"):
        settings = settings_for(cfg(width=640, height=640), "x")
    assert "640x640" in caplog.text and "832x480" in caplog.text
    assert (settings.width, settings.height, settings.fps, settings.scheduler) == (640, 640, 16, "unipc")
    assert settings.flow_shift == 5.0 and settings.guidance_scale == 5.0  # the flavour's defaults


def test_contact_sheet_layout(tmp_path):
    assert frame_indices(81, 8) == [0, 11, 23, 34, 46, 57, 69, 80]
    assert frame_indices(5, 8) == [0, 1, 2, 3, 4]
    video = np.zeros((9, 32, 48, 3), dtype=np.uint8)
    video[-1] = 255
    path = contact_sheet([("a", video), ("b", video.astype(np.float32) / 255)], tmp_path / "sheet.png", columns=4)
    image = np.asarray(Image.open(path))
    assert image.shape == (2 * (32 + LABEL_HEIGHT), 4 * 48, 3)
    assert image[LABEL_HEIGHT + 5, 3 * 48 + 5].tolist() == [255, 255, 255]  # last column shows the last frame
    assert image[LABEL_HEIGHT + 5, 5].tolist() == [0, 0, 0]


def test_validate_command_renders_every_prompt_with_the_settings(clips, tmp_path):
    """`wanforge validate CONFIG --lora PATH`: a library of two prompts, Euler, SLG, a custom size and length."""
    from peft.utils import get_peft_model_state_dict

    cfg = tiny_config(clips, tmp_path / "run")
    transformer = load_transformer(cfg.model)
    add_lora(transformer, cfg.lora)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lora = save_lora(get_peft_model_state_dict(transformer), tmp_path / "lora", rank=cfg.lora.rank,
                     alpha=cfg.lora.effective_alpha)
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"square": "a <token> square", "circle": "a circle"}))
    config = tmp_path / "config.toml"

    def run(out, **validation):
        c = tiny_config(clips, tmp_path / "run", validation=validation)
        save_config(c, config)
        assert cli(["validate", str(config), "--lora", str(lora), "--out", str(out)]) == 0

    settings = {"prompt_library": str(library), "instance_prompt": "sks", "num_frames": 5, "width": 48, "height": 32,
                "num_inference_steps": 3, "scheduler": "flow_match_euler", "skip_layers": [1], "skip_layer_start": 0.0}
    run(tmp_path / "a", **settings)
    for name in ("square", "circle"):
        frames, times = decode_frames(tmp_path / "a" / f"{name}.mp4")
        assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
        assert times[1] == pytest.approx(1 / 16, abs=1e-3)
    sheet = np.asarray(Image.open(tmp_path / "a" / "contact_sheet.png"))
    assert sheet.shape[1:] == (5 * 48, 3)  # two rows of 32-pixel tiles, each under its (wrapped) label
    assert sheet.shape[0] > 2 * (32 + LABEL_HEIGHT) and (sheet.shape[0] - 2 * 32) % LABEL_HEIGHT == 0
    # the settings reach the render: without skip-layer guidance the same video comes out different
    run(tmp_path / "b", **{**settings, "skip_layers": []})
    a, _ = decode_frames(tmp_path / "a" / "square.mp4")
    b, _ = decode_frames(tmp_path / "b" / "square.mp4")
    assert np.abs(np.stack(a).astype(int) - np.stack(b).astype(int)).mean() > 0.5
