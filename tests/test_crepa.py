"""CREPA with the tiny Wan (transformer + VAE) and a tiny DINOv2 built locally with transformers (no download)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from trainer.config.model import LoraConfig, ModelConfig
from trainer.config.training import CrepaConfig
from trainer.errors import UserError
from trainer.loop.crepa import Crepa, alignment_score, frames_for_latents, load_encoder

IMAGE = 28  # 2 x 2 DINO patches


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                     patch_size=14, image_size=IMAGE))
    path = tmp_path_factory.mktemp("dino")
    model.save_pretrained(path)
    return path


def _crepa_cfg(path, **kw) -> CrepaConfig:
    return CrepaConfig(enabled=True, block_index=1, encoder="dinov2_vits14", encoder_image_size=IMAGE,
                       encoder_path=str(path), **kw)


def test_alignment_score_weights_neighbours():
    frames, tokens = 3, 4
    basis = torch.eye(frames * tokens, 12)
    y = basis.reshape(1, frames, tokens, 12)  # every frame's features are orthogonal to every other frame's
    assert alignment_score(y, y, 0, 1.0).item() == pytest.approx(1.0)
    w = math.exp(-1 / 2.0)
    expected = (1 / (1 + w) + 1 / (1 + 2 * w) + 1 / (1 + w)) / 3  # only d = 0 matches; ends have one neighbour
    assert alignment_score(y, y, 1, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # frame f aligned to frame f+1's features: only the d = +1 neighbour matches
    shifted = torch.cat([y[:, 1:], y[:, :1]], dim=1)
    expected = (w / (1 + w) + w / (1 + 2 * w) + 0) / 3
    assert alignment_score(shifted, y, 1, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert alignment_score(-y, y, 1, 2.0).item() < 0


def test_frames_for_latents_picks_the_last_frame_of_each_group():
    pixels = torch.arange(9).float().view(1, 1, 9, 1, 1).expand(2, 3, 9, 2, 2)
    picked = frames_for_latents(pixels, 3)
    assert picked.shape == (2, 3, 3, 2, 2)
    assert picked[0, :, 0, 0, 0].tolist() == [0.0, 4.0, 8.0]


def test_encoder_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match="offline.*encoder_path"):
        load_encoder(CrepaConfig(enabled=True), torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="neither a dinov2 repo clone"):
        load_encoder(CrepaConfig(enabled=True, encoder_path=str(tmp_path)), torch.device("cpu"), torch.float32)


def test_tiny_encoder_gives_patch_tokens(tiny_dino):
    enc = load_encoder(_crepa_cfg(tiny_dino), torch.device("cpu"), torch.float32)
    out = enc(torch.rand(5, 3, 40, 56))
    assert out.shape == (5, 2, 2, 24) and enc.width == 24
    assert not any(p.requires_grad for p in enc.parameters())


def test_crepa_loss_falls_when_features_are_learnable(tiny_dino):
    """Train only on the CREPA loss for a fixed clip: the LoRA + head learn to predict the frozen DINO features."""
    from trainer.model.components import load_transformer, load_vae
    from trainer.model.lora import add_lora, trainable_parameters

    model_cfg = ModelConfig(flavour="tiny")
    transformer = load_transformer(model_cfg)
    add_lora(transformer, LoraConfig(rank=4))
    vae = load_vae(model_cfg).eval().requires_grad_(False)
    cfg = _crepa_cfg(tiny_dino, weight=1.0)
    crepa = Crepa(transformer, cfg, load_encoder(cfg, torch.device("cpu"), torch.float32), vae)
    params = trainable_parameters(transformer)
    assert any(p is crepa.head.proj.weight for p in params)  # the head trains with the LoRA
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 8, generator=g)  # 3 latent frames -> 9 decoded frames
    text = torch.randn(1, 12, 32, generator=g)
    optimizer = torch.optim.Adam(params, lr=3e-3)
    transformer.train()
    losses = []
    for _ in range(25):
        crepa.reset()
        transformer(hidden_states=latents * 0.5, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                    return_dict=False)
        loss = crepa.loss(latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    lora_b = {n: p for n, p in transformer.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 20 and all(p.abs().sum() > 0 for p in lora_b.values())  # every LoRA (zero-init B) learned


def test_training_with_crepa_tread_and_rollout(clips, tmp_path, tiny_dino):
    """All three through the real loop: metrics are logged, the head is in checkpoints, and a resume continues."""
    from trainer.loop.train import train

    settings = dict(
        train={"max_train_steps": 3}, validation={"at_end": False}, checkpoint={"every_n_steps": 2},
        crepa={"enabled": True, "block_index": 1, "encoder": "dinov2_vits14", "encoder_image_size": IMAGE,
               "encoder_path": str(tiny_dino)},
        tread={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 0}]},
        scheduled_sampling={"probability": 1.0, "steps": 2},
    )
    cfg = tiny_config(clips, tmp_path / "run", **settings)
    result = train(cfg, show_progress=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    assert all(0 < r["crepa_loss"] < 2 and r["rollout_fraction"] >= 0 for r in steps)
    assert any(r["rollout_fraction"] > 0 for r in steps)
    checkpoint = result.run_dir / "checkpoints" / "step-2"
    from trainer.loop.checkpointing import STATE_FILE, load_state_file

    assert load_state_file(checkpoint / STATE_FILE)["crepa_head"]  # the trained head, beside the optimizer
    cfg.train.max_train_steps = 4
    resumed = train(cfg, resume="latest", show_progress=False)
    assert resumed.final_step == 4
