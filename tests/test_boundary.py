"""Wan 2.2 A14B: the expert boundary comes from the checkpoint's own config (diffusers model_index.json
`boundary_ratio`) when it states one, with a warning when that differs from the flavour's; training uses it."""

import json
import logging
import shutil

import torch

from conftest import tiny_config
from trainer.config.model import ModelConfig
from trainer.loop import flow, train as train_module, training_step as training_step_module
from trainer.model.components import base_model_path
from trainer.model.experts import expert_boundary


def _model_with_boundary(tmp_path, flavour: str, boundary) -> str:
    folder = tmp_path / "wan22"
    shutil.copytree(base_model_path(ModelConfig(flavour=flavour)), folder)
    index = json.loads((folder / "model_index.json").read_text())
    if boundary is None:
        index.pop("boundary_ratio", None)
    else:
        index["boundary_ratio"] = boundary
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def test_the_models_own_boundary_wins_with_a_warning(tmp_path, caplog):
    assert expert_boundary(ModelConfig(flavour="tiny-t2v-2.2-high")) == 0.875  # states the flavour's own: no warning
    assert expert_boundary(ModelConfig(flavour="tiny")) is None
    path = _model_with_boundary(tmp_path, "tiny-i2v-2.2-low", 0.8)
    with caplog.at_level(logging.WARNING):
        assert expert_boundary(ModelConfig(flavour="tiny-i2v-2.2-low", pretrained_model_name_or_path=path)) == 0.8
    assert "boundary_ratio 0.8" in caplog.text and "0.9" in caplog.text
    other = _model_with_boundary(tmp_path / "b", "tiny-i2v-2.2-low", None)  # none stated: the flavour's
    assert expert_boundary(ModelConfig(flavour="tiny-i2v-2.2-low", pretrained_model_name_or_path=other)) == 0.9


def test_training_draws_noise_on_the_models_side_of_its_boundary(few_clips, tmp_path, monkeypatch):
    path = _model_with_boundary(tmp_path, "tiny-t2v-2.2-low", 0.3)
    seen = []

    def recording(*args, **kwargs):  # the real sampler; only records what it was asked and drew
        sigmas = flow.sample_training_sigmas(*args, **kwargs)
        seen.append((args[5] if len(args) > 5 else kwargs.get("boundary"), sigmas))
        return sigmas

    monkeypatch.setattr(training_step_module, "sample_training_sigmas", recording)
    cfg = tiny_config(few_clips, tmp_path / "run", train={"max_train_steps": 3},
                      model={"flavour": "tiny-t2v-2.2-low", "pretrained_model_name_or_path": path},
                      validation={"at_end": False, "eval_every_n_steps": 0})
    train_module.train(cfg, show_progress=False)
    assert seen and all(b == 0.3 for b, _ in seen)
    assert all(bool((s < 0.3).all()) for _, s in seen)  # the low expert's side of the model's boundary (not 0.875)
    assert torch.cat([s for _, s in seen]).numel() >= 3
