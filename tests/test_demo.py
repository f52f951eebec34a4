"""`wanforge demo`: the shipped pre-trained tiny Wan, its world, and the before/after a LoRA makes."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config.model import ModelConfig
from trainer.data.cache import encode_video
from trainer.data.video import decode_frames, write_mp4
from trainer.demo.pretrain import colour_check_clips, init_convolutions, round_trip
from trainer.demo.world import DEMO_FRAMES, DEMO_SIZE, BACKGROUNDS, CONCEPT_BACKGROUND, DEMO_MODEL_DIR, TRIGGER, concept_clips, world_clips
from trainer.model.components import load_text_encoder, load_tokenizer, load_transformer, load_vae
from trainer.model.tiny import demo_transformer, demo_vae


def test_the_base_world_never_shows_the_concept():
    """The LoRA's concept is new to the base: no world clip has the trigger word or the concept background."""
    world = world_clips()
    assert len(world) == 48 and len({c for c, _ in world}) == 48
    assert all(TRIGGER not in c for c, _ in world)
    assert CONCEPT_BACKGROUND not in BACKGROUNDS.values()
    assert all(not (clip == CONCEPT_BACKGROUND).all(-1).any() for _, clip in world)
    concept = concept_clips()
    assert all(TRIGGER in c for c, _ in concept) and all((clip[:, 0, 0] == CONCEPT_BACKGROUND).all() for _, clip in concept)


def test_shipped_model_loads_and_its_vae_is_trained():
    """The shipped weights load through the same calls as any checkpoint (fp16 files -> fp32), are small, and the
    VAE reconstructs a clip of the demo's world (mean error ~0.1 on [-1, 1]; the random VAE of the same shape: 0.92)."""
    files = list(DEMO_MODEL_DIR.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"transformer", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    model = ModelConfig(flavour="tiny", pretrained_model_name_or_path=str(DEMO_MODEL_DIR))
    transformer, vae = load_transformer(model), load_vae(model)
    assert transformer.dtype == torch.float32 and vae.dtype == torch.float32
    assert load_tokenizer(model)("a red circle").input_ids and load_text_encoder(model).config.d_model == 32
    caption, clip = world_clips()[0]
    latents = encode_video(vae, torch.from_numpy(clip), torch.device("cpu"))
    assert latents.shape == (16, (DEMO_FRAMES - 1) // 4 + 1, DEMO_SIZE // 8, DEMO_SIZE // 8)
    assert 0.3 < float(latents.std()) < 3.0  # normalised with the latents_mean / latents_std in its config
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        decoded = vae.decode(latents[None] * std + mean).sample[0]
    pixels = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert float((decoded - pixels).abs().mean()) < 0.25, caption


def test_cache_encoding_and_validation_decoding_agree():
    """The latents training caches (normalised with latents_mean / latents_std) decode through the validation
    pipeline to exactly what the VAE decodes from the posterior mean: no sign, scale or channel-order mismatch
    between the two conventions, whatever the statistics (a random VAE with non-trivial ones, initialised so that
    its output depends on its latents)."""
    torch.manual_seed(0)
    vae, transformer = init_convolutions(demo_vae()).eval(), demo_transformer().eval()
    vae.register_to_config(latents_mean=torch.randn(16).tolist(), latents_std=(torch.rand(16) * 2 + 0.5).tolist())
    clip = colour_check_clips(1, 32)["red"]
    with torch.no_grad():
        direct = vae.decode(vae.encode(torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
                            .latent_dist.mode()).sample[0].permute(1, 2, 3, 0)
    expected = ((direct.numpy() + 1) * 127.5).round()
    assert np.abs(round_trip(vae, transformer, clip, torch.device("cpu")).astype(float) - expected).max() <= 1


def test_shipped_vae_gives_the_demo_colours_back(tmp_path):
    """Each colour the demo draws, encoded as training caches it and decoded as validation renders it (then
    through the mp4 the demo writes), comes back as itself: the shape's centre and the background within 64 of 255
    per channel. The first shipped VAE drew red as grey-purple (sampled posteriors at std ~1 hid the colours); an
    inverted or mis-normalised path is off by 100 or more, while this 1.4 MB VAE shifts bright colours by up to ~50
    (yellow's green channel: 215 -> 251 on grey, 165 on purple)."""
    model = ModelConfig(flavour="tiny", pretrained_model_name_or_path=str(DEMO_MODEL_DIR))
    vae, transformer = load_vae(model).eval(), load_transformer(model).eval()
    c = DEMO_SIZE // 2
    for name, clip in colour_check_clips().items():
        video = write_mp4(tmp_path / "round_trip.mp4", round_trip(vae, transformer, clip, torch.device("cpu")), 16)
        out = np.stack(decode_frames(video)[0]).astype(float)
        for where in (np.s_[4, c - 3:c + 3, c - 3:c + 3], np.s_[:, :6, :6]):
            got, want = out[where].reshape(-1, 3).mean(0), clip[where].reshape(-1, 3).mean(0)
            assert np.abs(got - want).max() < 64, (name, want, got)


def test_demo_end_to_end(tmp_path):
    """The README's first command with fewer steps: the shipped model, concept clips, a LoRA through `train`,
    the before/after mp4 and contact sheet, and an eval loss that falls."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "demo", "--out", str(out), "--steps", "30"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "run"
    assert (run / "lora" / "wanforge_lora.safetensors").stat().st_size > 0
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    frames, times = decode_frames(out / "before_after.mp4")
    assert len(frames) == DEMO_FRAMES and frames[0].shape[0] == 3 * DEMO_SIZE and times[1] == pytest.approx(1 / 16, abs=1e-3)
    sheet = Image.open(out / "before_after.png")
    assert sheet.size == (DEMO_FRAMES * 3 * DEMO_SIZE, 2 * (3 * DEMO_SIZE + 14))
    found = re.search(r"eval loss\s+: (\d+\.\d+) -> (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout
    before, after = map(float, found.groups())
    assert after < 0.8 * before
    # right half (base + LoRA) is nearer the concept background than the left half (base) in the corners
    video = np.stack(frames).astype(float)
    width = 3 * DEMO_SIZE
    corner = lambda part: np.abs(part[:, :8, :8] - np.array(CONCEPT_BACKGROUND)).mean()  # noqa: E731
    assert corner(video[:, :, width + 8:]) < corner(video[:, :, :width])
