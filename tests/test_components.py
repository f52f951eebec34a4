"""Loading: the tiny model goes through the same from_pretrained calls as a Hub checkpoint; transformer overrides."""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

from trainer.config.model import ModelConfig
from trainer.errors import UserError
from trainer.model.components import base_model_path, component_id, load_transformer, load_vae
from trainer.model.tiny import ensure_tiny_model


def test_tiny_model_is_a_diffusers_pipeline_folder():
    path = ensure_tiny_model()
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert isinstance(load_transformer(ModelConfig(flavour="tiny")), WanTransformer3DModel)
    assert isinstance(load_vae(ModelConfig(flavour="tiny")), AutoencoderKLWan)


def test_flavours_point_at_the_official_diffusers_repos():
    assert base_model_path(ModelConfig()) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert base_model_path(ModelConfig(flavour="t2v-480p-14b-2.1")) == "Wan-AI/Wan2.1-T2V-14B-Diffusers"


def test_local_folder_as_base_model(tmp_path):
    import shutil

    copy = tmp_path / "my-wan"
    shutil.copytree(ensure_tiny_model(), copy)
    model = ModelConfig(flavour="tiny", pretrained_model_name_or_path=str(copy))
    assert load_transformer(model).config.num_layers == 2
    assert component_id(model, "vae") != component_id(ModelConfig(flavour="tiny"), "vae")  # caches don't mix models


def _perturbed_transformer():
    t = load_transformer(ModelConfig(flavour="tiny"))
    with torch.no_grad():
        t.proj_out.weight.add_(1.0)
    return t


def test_transformer_override_folder_with_and_without_subfolder(tmp_path):
    finetune = _perturbed_transformer()
    finetune.save_pretrained(tmp_path / "ft" / "transformer")
    finetune.save_pretrained(tmp_path / "flat")
    for path, sub in ((tmp_path / "ft", "transformer"), (tmp_path / "flat", None)):
        model = ModelConfig(flavour="tiny", pretrained_transformer_model_name_or_path=str(path),
                            pretrained_transformer_subfolder=sub)
        loaded = load_transformer(model)
        torch.testing.assert_close(loaded.proj_out.weight, finetune.proj_out.weight)


def test_transformer_override_single_safetensors_file(tmp_path):
    finetune = _perturbed_transformer()
    file = tmp_path / "finetune.safetensors"
    save_file(finetune.state_dict(), str(file))
    loaded = load_transformer(ModelConfig(flavour="tiny", pretrained_transformer_model_name_or_path=str(file)))
    torch.testing.assert_close(loaded.proj_out.weight, finetune.proj_out.weight)


def test_unusable_override_file_is_a_user_error(tmp_path):
    file = tmp_path / "other.safetensors"
    save_file({"something.weight": torch.zeros(2, 2)}, str(file))
    with pytest.raises(UserError, match="pretrained_transformer_model_name_or_path"):
        load_transformer(ModelConfig(flavour="tiny", pretrained_transformer_model_name_or_path=str(file)))


def test_unreachable_hub_model_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load the VAE from no-such-org/no-such-wan"):
        load_vae(ModelConfig(pretrained_model_name_or_path="no-such-org/no-such-wan"))
