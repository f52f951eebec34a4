"""Every Wan architecture: flavours and aliases, Wan 2.2 expert routing, two-expert runs, loading of custom parts,
and a few training steps + a validation video on each tiny architecture."""

import shutil

import pytest
import torch

from conftest import tiny_config
from trainer.config.files import config_from_dict
from trainer.config.model import ModelConfig
from trainer.config.training import FlowConfig
from trainer.data.video import decode_frames
from trainer.errors import UserError
from trainer.flavours import FLAVOURS, get_flavour
from trainer.loop.flow import stage_sigmas
from trainer.loop.flow import sample_sigmas, timesteps_from_sigmas
from trainer.loop.train import train
from trainer.model.components import base_model_path, component_id, load_transformer, load_vae


def test_flavour_table_and_simpletuner_aliases(tmp_path):
    assert get_flavour("t2v-14b-2.2-high").boundary == 0.875 and get_flavour("i2v-14b-2.2-low").boundary == 0.9
    assert get_flavour("t2v-14b-2.2-high").expert_subfolder == "transformer"  # diffusers: transformer = high noise
    assert get_flavour("i2v-14b-2.2-low").expert_subfolder == "transformer_2"
    ti2v = get_flavour("ti2v-5b-2.2")
    assert (ti2v.fps, ti2v.vae, ti2v.latent_channels, ti2v.vae_spatial, ti2v.num_frames) == (24, "2.2", 48, 16, 121)
    assert get_flavour("i2v-480p-14b-2.1").in_channels == 36 and get_flavour("i2v-480p-14b-2.1").image_encoder
    assert not get_flavour("i2v-14b-2.2-high").image_encoder  # Wan 2.2 I2V has no CLIP
    for alias, ours in (("i2v-14b-2.1", "i2v-480p-14b-2.1"), ("i2v-14b-2.1-720p", "i2v-720p-14b-2.1"),
                        ("i2v-14b-2.2-high", "i2v-14b-2.2-high"), ("ti2v-5b-2.2", "ti2v-5b-2.2")):
        cfg = config_from_dict({"model": {"flavour": alias}, "datasets": [{"path": str(tmp_path)}]})
        assert cfg.model.flavour == ours
    with pytest.raises(UserError, match='did you mean "i2v-14b-2.2-low"'):
        config_from_dict({"model": {"flavour": "i2v-14b-2.2-lo"}, "datasets": [{"path": str(tmp_path)}]})
    with pytest.raises(UserError, match="train_both_experts needs a Wan 2.2 A14B flavour"):
        config_from_dict({"model": {"flavour": "tiny", "train_both_experts": True}, "datasets": [{"path": str(tmp_path)}]})
    with pytest.raises(UserError, match="multiples of 32"):  # Wan 2.2 VAE 16x + patch 2
        config_from_dict({"model": {"flavour": "ti2v-5b-2.2"},
                          "datasets": [{"path": str(tmp_path), "width": 1280, "height": 720}]})
    tiny = {f.tiny for f in FLAVOURS.values() if f.hub_id is None}
    assert tiny == {"t2v-2.1", "i2v-2.1", "t2v-2.2", "i2v-2.2", "ti2v", "vace-2.1", "vace-2.2"}


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform", "shift"])
@pytest.mark.parametrize("boundary", [0.875, 0.9])
def test_stage_sigmas_stay_on_their_side_and_keep_the_shape(sampling, boundary):
    cfg = FlowConfig(timestep_sampling=sampling)
    g = torch.Generator().manual_seed(0)
    reference = sample_sigmas(400_000, cfg, g)
    for stage in ("high", "low"):
        s = stage_sigmas(100_000, cfg, g, stage, boundary)
        t = timesteps_from_sigmas(s)  # what the transformer sees; pipelines route on t >= boundary * 1000
        assert bool((t >= boundary * 1000).all()) if stage == "high" else bool((t < boundary * 1000).all())
        ref = reference[reference >= boundary] if stage == "high" else reference[reference < boundary]
        # the conditional distribution of the configured one: same quartiles
        for q in (0.25, 0.5, 0.75):
            assert abs(float(torch.quantile(s[:50_000], q)) - float(torch.quantile(ref[:50_000], q))) < 0.01


def test_two_expert_run_routes_timesteps_and_writes_two_loras(few_clips, tmp_path, monkeypatch):
    """train_both_experts on the tiny Wan 2.2: every forward of the high expert (training steps and validation) is at
    t >= 875, of the low expert below; each LoRA loads into its slot of WanPipeline."""
    import trainer.model.experts as experts
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    from trainer.outputs.export import read_lora

    seen = {"high": [], "low": []}
    pairs = []
    original = experts.setup_expert_pair

    def recording(*args, **kwargs):
        pair = original(*args, **kwargs)
        for stage in ("high", "low"):
            pair.expert(stage).register_forward_pre_hook(
                lambda m, a, kw, stage=stage: seen[stage].append(kw["timestep"].detach().flatten().cpu()),
                with_kwargs=True)
        pairs.append(pair)
        return pair

    monkeypatch.setattr(experts, "setup_expert_pair", recording)
    monkeypatch.setattr("trainer.loop.train.setup_expert_pair", recording)
    cfg = tiny_config(few_clips, tmp_path / "run",
                      model={"flavour": "tiny-t2v-2.2-high", "train_both_experts": True, "expert_switch_every_n_steps": 2},
                      train={"max_train_steps": 4}, validation={"num_inference_steps": 4, "eval_every_n_steps": 0},
                      checkpoint={"every_n_steps": 4})
    result = train(cfg, show_progress=False)
    high, low = torch.cat(seen["high"]), torch.cat(seen["low"])
    assert len(high) >= 2 * 2 and len(low) >= 2 * 2  # 2 training steps each (batch 2) + validation steps
    assert bool((high >= 875).all()) and bool((low < 875).all())

    files = {s: tmp_path / "run" / "lora" / f"{s}_noise" / "wanforge_lora.safetensors" for s in ("high", "low")}
    assert result.lora_file == files["high"] and all(f.is_file() for f in files.values())
    pipe = WanPipeline.from_pretrained(base_model_path(cfg.model))
    pipe.load_lora_weights(str(files["high"]), adapter_name="high")
    pipe.load_lora_weights(str(files["low"]), adapter_name="low", load_into_transformer_2=True)
    for stage, module in (("high", pipe.transformer), ("low", pipe.transformer_2)):
        trained, _, _ = read_lora(files[stage])
        loaded = get_peft_model_state_dict(module, adapter_name=stage)
        key = "blocks.0.attn1.to_q.lora_B.weight"
        torch.testing.assert_close(loaded[key], trained[key])
        assert float(trained[key].abs().sum()) > 0  # trained: lora_B starts at zero
    trained_high, _, _ = read_lora(files["high"])
    trained_low, _, _ = read_lora(files["low"])
    assert not torch.equal(trained_high["blocks.0.attn1.to_q.lora_B.weight"], trained_low["blocks.0.attn1.to_q.lora_B.weight"])


@pytest.mark.parametrize("flavour", ["tiny-i2v-2.1", "tiny-i2v-2.2-low", "tiny-ti2v"])
def test_each_architecture_trains_and_renders(flavour, few_clips, tmp_path):
    cfg = tiny_config(few_clips, tmp_path / "run", model={"flavour": flavour}, train={"max_train_steps": 2},
                      validation={"num_inference_steps": 2, "eval_every_n_steps": 2}, checkpoint={"every_n_steps": 2})
    result = train(cfg, show_progress=False)
    assert result.final_step == 2 and result.lora_file.stat().st_size > 0
    frames, times = decode_frames(result.videos[0])
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    assert times[1] == pytest.approx(1 / get_flavour(flavour).fps, abs=1e-3)
    if flavour == "tiny-i2v-2.1":  # a LoRA trained on the I2V checkpoint is a T2V LoRA too (same modules, no _img)
        from diffusers import WanPipeline

        t2v = WanPipeline.from_pretrained(base_model_path(ModelConfig(flavour="tiny")))
        t2v.load_lora_weights(str(result.lora_file))
        assert any("lora_B" in k for k in t2v.transformer.state_dict())


def test_expert_flavours_load_their_own_expert():
    high = load_transformer(ModelConfig(flavour="tiny-t2v-2.2-high"))
    low = load_transformer(ModelConfig(flavour="tiny-t2v-2.2-low"))
    from diffusers import WanTransformer3DModel

    stored_low = WanTransformer3DModel.from_pretrained(base_model_path(ModelConfig(flavour="tiny-t2v-2.2-low")),
                                                       subfolder="transformer_2")
    torch.testing.assert_close(low.proj_out.weight, stored_low.proj_out.weight)
    assert not torch.equal(high.proj_out.weight, low.proj_out.weight)


def test_separate_vae_path(tmp_path):
    folder = base_model_path(ModelConfig(flavour="tiny-ti2v"))
    shutil.copytree(f"{folder}/vae", tmp_path / "my-vae")
    model = ModelConfig(flavour="tiny", pretrained_vae_model_name_or_path=str(tmp_path / "my-vae"))
    assert load_vae(model).config.z_dim == 48  # the other VAE, not the flavour's
    assert component_id(model, "vae") != component_id(ModelConfig(flavour="tiny"), "vae")  # caches don't mix
    with pytest.raises(UserError, match="model.pretrained_vae_model_name_or_path"):
        load_vae(ModelConfig(flavour="tiny", pretrained_vae_model_name_or_path=str(tmp_path / "nothing-here")))


def _to_original_wan_keys(state: dict) -> dict:
    """diffusers WanTransformer3DModel keys -> the original Wan layout (the inverse of diffusers' single-file rename)."""
    import re as _re

    renames = [
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("attn2", "cross_attn"), ("attn1", "self_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
        (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
        ("norm2", "norm__swap"), ("norm3", "norm2"), ("norm__swap", "norm3"),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        new = "head.modulation" if new == "scale_shift_table" else _re.sub(r"\.scale_shift_table$", ".modulation", new)
        out[new] = value
    return out


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_comfyui_style_single_file_finetune(prefix, tmp_path):
    """An original-layout .safetensors (ComfyUI's repackaged files, with or without its prefix) loads through
    diffusers' from_single_file into the flavour's config, weights intact."""
    from safetensors.torch import save_file

    finetune = load_transformer(ModelConfig(flavour="tiny"))
    with torch.no_grad():
        finetune.proj_out.weight.add_(1.0)
        finetune.blocks[1].norm2.weight.add_(0.5)
    original = {prefix + k: v.contiguous() for k, v in _to_original_wan_keys(finetune.state_dict()).items()}
    assert f"{prefix}blocks.0.self_attn.q.weight" in original and f"{prefix}head.modulation" in original
    file = tmp_path / "wan_finetune.safetensors"
    save_file(original, str(file))
    loaded = load_transformer(ModelConfig(flavour="tiny", pretrained_transformer_model_name_or_path=str(file)))
    for key, value in finetune.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
