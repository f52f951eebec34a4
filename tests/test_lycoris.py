"""LyCORIS (lycoris-lora) adapters: they train, resume, and export with the kohya-style keys ComfyUI maps for Wan;
the exported file, applied by ComfyUI's rules (and LoCon through diffusers' real loader), gives the trained model."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_rules import load_like_comfyui, transformer_inputs
from conftest import tiny_config
from trainer.config.files import config_from_dict
from trainer.config.model import DEFAULT_TARGET_MODULES, LoraConfig, ModelConfig
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.model.components import load_transformer
from trainer.model.lora_names import flavour_modules, interchange_problems, lycoris_targets, to_original
from trainer.model.lycoris import add_lycoris, network_of, to_comfyui
from trainer.outputs.export import save_adapter

# ComfyUI's model_lora_keys_unet maps "lora_unet_<module with dots as underscores>" for every
# diffusion_model.<module>.weight; its LoKr / LoHa / LoCon adapters read these suffixes.
SUFFIXES = {"alpha", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "hada_w1_a",
            "hada_w1_b", "hada_w2_a", "hada_w2_b", "lora_up.weight", "lora_down.weight"}


def _original_module_keys(transformer) -> set[str]:
    """lora_unet_* names of the original Wan modules the adapters may target."""
    names = set()
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and re.match(r"^blocks\.\d+\.", name) and to_original(name):
            names.add("lora_unet_" + to_original(name).replace(".", "_"))
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


def _trained_network(flavour, tmp_path, **kwargs):
    """The transformer with a LyCORIS network whose weights are all random (as after training)."""
    transformer = load_transformer(ModelConfig(flavour=flavour))
    config = _config(tmp_path, **kwargs)
    network = add_lycoris(transformer, config, DEFAULT_TARGET_MODULES)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer.eval(), config


IMAGE_PRESET = {"target_module": ["WanAttention", "FeedForward"]}  # FeedForward includes the I2V image embedder's


@pytest.mark.parametrize("algo, extra", [("lokr", {"factor": 4}), ("lokr", {"factor": 4, "linear_dim": 10000}),
                                         ("loha", {}), ("locon", {}), ("full", {})])
def test_exported_file_at_strength_one_is_the_trained_model(algo, extra, tmp_path):
    """multiplier 0.5 trains half the update of the weights; the file carries it, so ComfyUI at 1.0 gives the trained
    output, on every module the preset reaches (the I2V image embedder included)."""
    kwargs = {"algo": algo, "linear_dim": 4, "linear_alpha": 2, "multiplier": 0.5, "apply_preset": IMAGE_PRESET, **extra}
    transformer, config = _trained_network("tiny-i2v-2.1", tmp_path, **kwargs)
    cfg = config_from_dict({"datasets": [{"path": "x"}], "model": {"flavour": "tiny-i2v-2.1"},
                            "lora": {"lora_type": "lycoris", "lycoris_config": str(config)}})
    assert interchange_problems(cfg) == []
    with torch.no_grad():
        trained = transformer(**transformer_inputs(True, 300.0))[0]
    path = save_adapter(transformer, network_of(transformer).state_dict(), tmp_path / "lora", cfg.lora, {})
    state = load_file(str(path))
    assert any(k.startswith("lora_unet_img_emb_proj_1.") for k in state)
    assert any(k.startswith("lora_unet_blocks_1_cross_attn_k_img.") for k in state)

    def base():
        return load_transformer(ModelConfig(flavour="tiny-i2v-2.1")).eval()

    with torch.no_grad():
        comfy = load_like_comfyui(base, state)(**transformer_inputs(True, 300.0))[0]
        untouched = base()(**transformer_inputs(True, 300.0))[0]
    torch.testing.assert_close(comfy, trained, rtol=1e-4, atol=1e-5)
    assert (trained - untouched).abs().max() > 1e-3


def test_locon_loads_in_diffusers_as_it_is(tmp_path):
    from diffusers import WanPipeline

    transformer, config = _trained_network("tiny", tmp_path, algo="locon", linear_dim=4, linear_alpha=2, multiplier=2.0)
    with torch.no_grad():
        trained = transformer(**transformer_inputs(False, 300.0))[0]
    lora = LoraConfig(lora_type="lycoris", lycoris_config=config)
    path = save_adapter(transformer, network_of(transformer).state_dict(), tmp_path / "lora", lora, {})
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                       transformer=load_transformer(ModelConfig(flavour="tiny")))
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**transformer_inputs(False, 300.0))[0], trained, rtol=1e-4, atol=1e-5)


PRESETS = [
    None,
    IMAGE_PRESET,
    {"target_module": ["WanTransformerBlock"], "exclude_name": [r".*ffn.*"]},
    {"target_module": [], "target_name": ["condition_embedder.*"], "use_fnmatch": True},
    {"target_name": [r"^blocks\.1\.attn2\."]},  # the lycoris default classes (every Linear) stay targeted
    {"target_module": ["WanTransformer3DModel"]},  # everything, patch_embedding (a conv) included
    {"module_algo_map": {"FeedForward": {"algo": "loha"}}, "target_module": ["WanAttention"]},
]


@pytest.mark.parametrize("preset", PRESETS)
def test_preflight_predicts_the_modules_lycoris_adapts(preset, tmp_path):
    """lora_names.lycoris_targets (torch-free) picks exactly the modules the real lycoris picks."""
    kwargs = {"algo": "locon", "linear_dim": 4, **({"apply_preset": preset} if preset is not None else {})}
    transformer = load_transformer(ModelConfig(flavour="tiny-i2v-2.1"))
    add_lycoris(transformer, _config(tmp_path, **kwargs), DEFAULT_TARGET_MODULES)
    real = sorted(lora.lora_name for lora in network_of(transformer).loras)
    from trainer.model.lora_names import default_lycoris_preset

    predicted = lycoris_targets(kwargs, preset if preset is not None else default_lycoris_preset(DEFAULT_TARGET_MODULES),
                                flavour_modules("tiny-i2v-2.1", num_layers=len(transformer.blocks)))
    assert sorted("lycoris_" + n.replace(".", "_") for n, _ in predicted) == real


def test_preflight_refuses_lycoris_files_that_cannot_be_saved(tmp_path):
    def problems(**kwargs):
        cfg = config_from_dict({"datasets": [{"path": "x"}], "model": {"flavour": "tiny-i2v-2.1"},
                                "lora": {"lora_type": "lycoris", "lycoris_config": str(_config(tmp_path, **kwargs))}})
        return interchange_problems(cfg)

    assert problems(algo="lokr") == [] and problems(algo="loha", apply_preset=IMAGE_PRESET) == []
    assert "patch_embedding" in problems(algo="locon", apply_preset={"target_module": ["WanTransformer3DModel"]})[0]
    assert "norm" in problems(algo="locon", train_norm=True, apply_preset=IMAGE_PRESET)[0]
    assert 'algo "ia3"' in problems(algo="ia3")[0]
    assert "dora_wd" in problems(algo="locon", dora_wd=True, multiplier=0.5)[0]
    assert "matches no module" in problems(algo="lokr", apply_preset={"target_name": ["^nothing$"], "target_module": []})[0]


@pytest.mark.parametrize("config, words", [
    ({"algo": "lokr", "multiplier": "strong"}, "multiplier"),
    ({"algo": "lokr", "apply_preset": {"target_modules": ["WanAttention"]}}, "target_modules"),
    ({"algo": "lokr", "apply_preset": {"target_module": ["WanAttention"], "exclude_name": None}}, "apply_preset"),
    ({"algo": "lokr", "apply_preset": {"target_name": ["(unclosed"]}}, "apply_preset"),
    ({"algo": "lokr", "apply_preset": ["WanAttention"]}, "JSON object"),
])
def test_preflight_names_broken_lycoris_configs(config, words, tmp_path):
    cfg = config_from_dict({"datasets": [{"path": "x"}], "lora": {"lora_type": "lycoris",
                                                                   "lycoris_config": str(_config(tmp_path, **config))}})
    problems = interchange_problems(cfg)
    assert len(problems) == 1 and words in problems[0] and "lycoris_config" in problems[0]
