"""LyCORIS (lycoris-lora) adapters: they train, resume, and export with the kohya-style keys ComfyUI maps for Wan."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from trainer.components import load_transformer
from trainer.config import DEFAULT_TARGET_MODULES, ModelConfig
from trainer.errors import UserError
from trainer.export import _to_original
from trainer.lycoris_adapter import add_lycoris, to_comfyui
from trainer.train import train

# ComfyUI's model_lora_keys_unet maps "lora_unet_<module with dots as underscores>" for every
# diffusion_model.<module>.weight; its LoKr / LoHa / LoCon adapters read these suffixes.
SUFFIXES = {"alpha", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "hada_w1_a",
            "hada_w1_b", "hada_w2_a", "hada_w2_b", "lora_up.weight", "lora_down.weight"}


def _original_module_keys(transformer) -> set[str]:
    """lora_unet_* names of the original Wan modules the adapters may target."""
    names = set()
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and re.match(r"^blocks\.\d+\.", name):
            try:
                names.add("lora_unet_" + _to_original(name).replace(".", "_"))
            except UserError:
                continue
    return names


def _config(tmp_path, **kwargs):
    path = tmp_path / "lycoris.json"
    path.write_text(json.dumps(kwargs))
    return path


@pytest.mark.parametrize("algo, extra", [("lokr", {"factor": 4}), ("loha", {}), ("locon", {})])
def test_export_keys_are_comfyui_names(algo, extra, tmp_path):
    transformer = load_transformer(ModelConfig(flavour="tiny"))
    cfg = _config(tmp_path, algo=algo, linear_dim=4, linear_alpha=2, **extra)
    add_lycoris(transformer, cfg, DEFAULT_TARGET_MODULES)
    exported = to_comfyui(transformer, torch.float32)
    modules = _original_module_keys(transformer)
    seen = set()
    for key in exported:
        module, _, suffix = key.partition(".")
        assert module in modules and suffix in SUFFIXES, key
        seen.add(module)
    assert len(seen) == 2 * len(DEFAULT_TARGET_MODULES)  # every adapted layer of both blocks
    assert "lora_unet_blocks_0_self_attn_q" in seen and "lora_unet_blocks_1_ffn_2" in seen


def test_lokr_trains_resumes_and_exports_its_delta(few_clips, tmp_path):
    config = _config(tmp_path, algo="lokr", linear_dim=10000, linear_alpha=1, factor=4)  # full-matrix LoKr
    cfg = tiny_config(few_clips, tmp_path / "run", lora={"lora_type": "lycoris", "lycoris_config": str(config)},
                      train={"max_train_steps": 2}, checkpoint={"every_n_steps": 1},
                      validation={"num_inference_steps": 2, "eval_every_n_steps": 0})
    train(cfg, show_progress=False)
    cfg.train.max_train_steps = 3
    result = train(cfg, resume="latest", show_progress=False)  # the checkpoint holds the LyCORIS network
    assert result.final_step == 3 and result.videos
    with safe_open(str(result.lora_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["wanforge"])["lora_type"] == "lycoris"
    w1, w2 = state["lora_unet_blocks_0_self_attn_q.lokr_w1"], state["lora_unet_blocks_0_self_attn_q.lokr_w2"]
    # ComfyUI's LoKr patch for full matrices: W += kron(w1, w2); the trained delta is non-zero
    delta = torch.kron(w1, w2)
    assert delta.shape == (32, 32) and float(delta.abs().sum()) > 0

    transformer = load_transformer(cfg.model)
    network = add_lycoris(transformer, config, DEFAULT_TARGET_MODULES)
    live = {k.partition(".")[0]: None for k in network.state_dict()}
    assert "lycoris_blocks_0_attn1_to_q" in live
    module = next(m for m in network.loras if m.lora_name == "lycoris_blocks_0_attn1_to_q")
    module.lokr_w1.data.copy_(w1)
    module.lokr_w2.data.copy_(w2)
    x = torch.randn(3, 32)
    base = transformer.blocks[0].attn1.to_q
    expected = torch.nn.functional.linear(x, base.weight + delta, base.bias)
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)  # the live network applies the same delta


def test_lycoris_needs_a_config(clips, tmp_path):
    with pytest.raises(UserError, match="lycoris_config"):
        tiny_config(clips, tmp_path / "run", lora={"lora_type": "lycoris"})
    transformer = load_transformer(ModelConfig(flavour="tiny"))
    with pytest.raises(UserError, match="does not exist"):
        add_lycoris(transformer, tmp_path / "missing.json", DEFAULT_TARGET_MODULES)
