"""Image conditioning equals what diffusers' pipelines build for the same image, tensor for tensor."""

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from trainer.data.cache import build_caches
from trainer.data.conditioning import build_conditioning, ti2v_first_frame_mask, transformer_inputs
from trainer.data.video import load_clip
from trainer.flavours import get_flavour
from trainer.model.components import base_model_path

CPU = torch.device("cpu")


def _first_sample(cfg):
    report = build_caches(cfg, CPU, show_progress=False)
    return report.samples[0][0]


def _first_frame(cfg, sample) -> Image.Image:
    frames, height, width = cfg.dataset_shape(0)
    clip = load_clip(sample.video, frames, height, width, get_flavour(cfg.model.flavour).fps)
    return Image.fromarray(clip[0].numpy())


@pytest.mark.parametrize("flavour", ["tiny-i2v-2.1", "tiny-i2v-2.2-high"])
def test_i2v_conditioning_matches_the_pipeline(flavour, few_clips, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    cfg = tiny_config(few_clips, tmp_path / "run", model={"flavour": flavour})
    sample = _first_sample(cfg)
    paths = build_conditioning(cfg, [sample.latent_path], CPU, show_progress=False)
    cached = load_file(str(paths[sample.latent_path]))

    frames, height, width = cfg.dataset_shape(0)
    pipe = WanImageToVideoPipeline.from_pretrained(base_model_path(cfg.model))
    image = _first_frame(cfg, sample)
    pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(CPU, dtype=torch.float32)
    _, condition = pipe.prepare_latents(pixels, 1, pipe.vae.config.z_dim, height, width, frames, torch.float32, CPU,
                                        torch.Generator().manual_seed(0))
    assert cached["condition"].shape == (20, (frames - 1) // 4 + 1, height // 8, width // 8)
    torch.testing.assert_close(cached["condition"], condition[0], rtol=0, atol=0)
    if get_flavour(flavour).image_encoder:
        torch.testing.assert_close(cached["image_embeds"], pipe.encode_image(image, CPU)[0], rtol=0, atol=0)
    else:
        assert "image_embeds" not in cached

    # the training input is the pipeline's: noisy latents, then mask + encoded conditioning video (36 channels)
    latents = load_file(str(sample.latent_path))["latents"][None]
    batch = {k: v[None] for k, v in cached.items()}
    t = torch.tensor([500.0])
    inputs = transformer_inputs(get_flavour(flavour), cfg.model, batch, latents, latents, t, CPU, torch.float32)
    assert inputs["hidden_states"].shape[1] == 36
    torch.testing.assert_close(inputs["hidden_states"], torch.cat([latents, condition], dim=1))


def test_ti2v_first_frame_is_the_encoded_image(few_clips, tmp_path):
    """TI2V takes the clean first latent frame from the cached video latents: it equals the pipeline's encoding of
    the image alone (causal VAE), and the per-token timesteps follow the pipeline's first_frame_mask."""
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    cfg = tiny_config(few_clips, tmp_path / "run", model={"flavour": "tiny-ti2v"})
    sample = _first_sample(cfg)
    latents = load_file(str(sample.latent_path))["latents"][None]
    frames, height, width = cfg.dataset_shape(0)
    assert latents.shape == (1, 48, (frames - 1) // 4 + 1, height // 16, width // 16)  # Wan 2.2 VAE

    pipe = WanImageToVideoPipeline.from_pretrained(base_model_path(cfg.model), expand_timesteps=True)
    pixels = pipe.video_processor.preprocess(_first_frame(cfg, sample), height=height, width=width)
    _, condition, mask = pipe.prepare_latents(pixels.to(torch.float32), 1, 48, height, width, frames, torch.float32,
                                              CPU, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents[:, :, :1], condition, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ti2v_first_frame_mask(latents), mask)

    noisy = torch.randn_like(latents)
    t = torch.tensor([700.0])
    inputs = transformer_inputs(get_flavour("tiny-ti2v"), cfg.model, {}, latents, noisy, t, CPU, torch.float32)
    expected_hidden = (1 - mask) * latents + mask * noisy
    torch.testing.assert_close(inputs["hidden_states"], expected_hidden)
    expected_t = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)
    torch.testing.assert_close(inputs["timestep"], expected_t)
    assert float(inputs["timestep"][0, 0]) == 0.0 and float(inputs["timestep"][0, -1]) == 700.0

    forced = cfg.model.model_copy(update={"wan_force_2_1_time_embedding": True})
    inputs = transformer_inputs(get_flavour("tiny-ti2v"), forced, {}, latents, noisy, t, CPU, torch.float32)
    assert inputs["timestep"].shape == (1,)


def test_wanforge_cache_builds_the_image_conditioning_so_train_encodes_none(few_clips, tmp_path, monkeypatch):
    """The conditioning is one of the caches: `wanforge cache` builds it (split across ranks like the latents), and
    the training run after it finds every entry on disk and loads no VAE for it."""
    from trainer.cli import main
    from trainer.config.files import save_config
    from trainer.data import conditioning
    from trainer.data.conditioning import conditioning_path
    from trainer.loop.train import train

    cfg = tiny_config(few_clips, tmp_path / "run", model={"flavour": "tiny-i2v-2.1"},
                      train={"max_train_steps": 1}, validation={"at_end": False, "eval_every_n_steps": 0})
    save_config(cfg, tmp_path / "i2v.toml")
    assert main(["cache", str(tmp_path / "i2v.toml")]) == 0
    report = build_caches(cfg, CPU, show_progress=False)
    latents = [s.latent_path for group in report.samples for s in group]
    assert latents and all(conditioning_path(cfg, lp).is_file() for lp in latents)
    assert report.built == 0 and report.built_conditioning == 0  # all of it was there already

    def no_vae(*args, **kwargs):
        raise AssertionError("train re-encoded image conditioning that `wanforge cache` had built")

    monkeypatch.setattr(conditioning, "i2v_condition", no_vae)
    train(cfg, show_progress=False)
