"""Caches hold exactly what the pipeline would compute: normalised posterior-mode latents, true-length UMT5 states."""

import torch
from safetensors.torch import load_file

from conftest import tiny_config
from trainer.data.cache import build_caches, text_path
from trainer.data.video import load_clip
from trainer.flavours import FLAVOURS
from trainer.model.components import load_text_encoder, load_tokenizer, load_vae


def test_latents_are_normalised_posterior_mode(dataset_copy, tmp_path):
    cfg = tiny_config(dataset_copy, tmp_path / "run")
    report = build_caches(cfg, torch.device("cpu"), show_progress=False)
    sample = report.samples[0][0]
    cached = load_file(str(sample.latent_path))["latents"]
    assert cached.shape == (16, 3, 8, 8)  # 9 frames -> 3 latent frames, 64 px -> 8
    vae = load_vae(cfg.model)
    clip = load_clip(sample.video, 9, 64, 64, FLAVOURS["tiny"].fps)
    x = clip.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean[0]
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    torch.testing.assert_close(cached, (mu - mean) / std, rtol=1e-4, atol=1e-4)


def test_text_embeddings_match_the_pipeline_at_true_length(dataset_copy, tmp_path):
    from diffusers import WanPipeline

    cfg = tiny_config(dataset_copy, tmp_path / "run")
    report = build_caches(cfg, torch.device("cpu"), show_progress=False)
    caption = report.samples[0][0].caption
    cached = load_file(str(text_path(cfg, caption)))["embeds"]
    tokenizer = load_tokenizer(cfg.model)
    n_tokens = len(tokenizer(caption).input_ids)
    assert cached.shape == (n_tokens, 32)  # true length, not padded to 512
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=load_text_encoder(cfg.model), vae=None, scheduler=None)
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=512,
                                          device=torch.device("cpu"))
    torch.testing.assert_close(cached, reference[0, :n_tokens])
    assert reference[0, n_tokens:].abs().max() == 0  # what the trainer's zero padding reproduces


def test_clips_are_resampled_to_the_model_fps(tmp_path):
    """A 32 fps source: frames are picked at 1/16 s steps (every second source frame), not consecutive."""
    import numpy as np

    from trainer.data.video import write_mp4

    frames = np.zeros((40, 32, 32, 3), dtype=np.uint8)
    for i in range(40):
        frames[i, :, :, 0] = i * 6  # the frame index is written in the red channel
    write_mp4(tmp_path / "fast.mp4", frames, fps=32, crf=0)
    clip = load_clip(tmp_path / "fast.mp4", 9, 32, 32, fps=16)
    red = clip[:, 16, 16, 0].float() / 6
    torch.testing.assert_close(red, torch.arange(0, 18, 2).float(), atol=0.6, rtol=0)
