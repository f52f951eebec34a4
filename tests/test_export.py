"""The saved LoRA loads where users load it: diffusers' real load_lora_weights (both formats) and ComfyUI's key rules
(tests/comfyui_rules.py), reproducing the trained model, for block and top-level targets, T2V and I2V."""

import re
import subprocess
import sys

import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from comfyui_rules import load_like_comfyui, transformer_inputs
from conftest import tiny_config
from trainer.config.files import config_from_dict
from trainer.config.model import DEFAULT_TARGET_MODULES, LoraConfig, ModelConfig
from trainer.loop.train import train
from trainer.model.components import load_transformer, load_vae
from trainer.model.lora import add_lora
from trainer.model.lora_names import LoRAFileError
from trainer.model.lora_names import interchange_problems, wan_modules
from trainer.outputs.export import (DIFFUSERS_FILE, INTERCHANGE_FILE, check_lora_file, convert_lora, read_lora,
                                    save_adapter)

RANK, ALPHA = 8, 4.0  # alpha != rank so a loader that ignores alpha gives a different output


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    cfg = tiny_config(clips, out / "run", train={"max_train_steps": 6}, optim={"learning_rate": 5e-3, "lr_warmup_steps": 0},
                      lora={"rank": RANK, "alpha": ALPHA}, validation={"at_end": False})
    result = train(cfg, show_progress=False)
    return cfg, result


@torch.no_grad()
def _trained_output(cfg, result):
    """The transformer exactly as training left it: base + the adapter from the last checkpoint."""
    model = load_transformer(cfg.model)
    add_lora(model, cfg.lora)
    ckpt = sorted((result.run_dir / "checkpoints").iterdir())[-1] / "adapter.safetensors"
    set_peft_model_state_dict(model, load_file(str(ckpt)))
    return model.eval()(**transformer_inputs(False, 500.0))[0]


def _pipeline(cfg):
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=load_vae(cfg.model), scheduler=None,
                       transformer=load_transformer(cfg.model))


def test_interchange_keys_use_original_wan_module_names(trained):
    """Native ComfyUI applies `diffusion_model.<name>` to the original Wan weight `<name>.weight`.

    diffusers' converter for original Wan checkpoints maps each such name onto the diffusers module; every
    module must exist with the shape the LoRA product B @ A has.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg, result = trained
    state = load_file(str(result.lora_file))
    pattern = re.compile(r"^diffusion_model\.(blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02])"
                         r"\.(lora_A\.weight|lora_B\.weight|alpha)$")
    assert all(pattern.match(k) for k in state), [k for k in state if not pattern.match(k)]
    modules = sorted({k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in state if "lora_A" in k})
    assert len(modules) == 2 * 10  # 2 blocks x (4 self + 4 cross + 2 ffn)
    fake_original = {
        f"{m}.weight": torch.empty(state[f"diffusion_model.{m}.lora_B.weight"].shape[0],
                                   state[f"diffusion_model.{m}.lora_A.weight"].shape[1])
        for m in modules
    }
    converted = convert_wan_transformer_to_diffusers(dict(fake_original))
    reference = load_transformer(cfg.model).state_dict()
    assert len(converted) == len(modules)
    for key, value in converted.items():
        assert key in reference, key
        assert reference[key].shape == value.shape, key
    assert all(float(state[f"diffusion_model.{m}.alpha"]) == ALPHA for m in modules)


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_lora_loads_into_wan_pipeline_and_reproduces_training(trained, tmp_path, fmt):
    cfg, result = trained
    path = result.lora_file
    if fmt == "diffusers":  # `wanforge export` from the interchange file the run saved
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "export", str(path), "--format", "diffusers",
                               "--out", str(tmp_path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        path = tmp_path / DIFFUSERS_FILE
        assert all(k.startswith("transformer.blocks.") for k in load_file(str(path)))
    pipe = _pipeline(cfg)
    with torch.no_grad():
        base_out = pipe.transformer(**transformer_inputs(False, 500.0))[0]
    pipe.load_lora_weights(str(path), adapter_name="wanforge")

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="wanforge")
    saved, _, _ = read_lora(result.lora_file)
    assert set(loaded) == set(saved)  # every saved tensor landed on a module, none was dropped

    with torch.no_grad():
        lora_out = pipe.transformer(**transformer_inputs(False, 500.0))[0]
    expected = _trained_output(cfg, result)
    assert (lora_out - base_out).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(lora_out, expected, rtol=1e-4, atol=1e-5)  # ...into what training produced


def test_export_round_trip_is_lossless(trained, tmp_path):
    cfg, result = trained
    subprocess.run([sys.executable, "-m", "launcher.cli", "export", str(result.lora_file), "--format", "diffusers",
                    "--out", str(tmp_path / "d")], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "launcher.cli", "export", str(tmp_path / "d" / DIFFUSERS_FILE), "--format",
                    "comfyui", "--out", str(tmp_path / "c")], check=True, capture_output=True)
    original = load_file(str(result.lora_file))
    again = load_file(str(tmp_path / "c" / INTERCHANGE_FILE))
    assert original.keys() == again.keys()
    for k in original:
        torch.testing.assert_close(again[k], original[k], rtol=0, atol=0)


def test_export_of_a_missing_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "export", str(tmp_path / "nope.safetensors"),
                           "--format", "diffusers"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such LoRA file" in proc.stderr


# ---------------------------------------------------------------- every target the original layout names

TOP_LEVEL = ["proj_out", "time_proj", "linear_1", "linear_2"]  # head.head, time_projection.1, time/text_embedding.0/.2
IMAGE = ["add_k_proj", "add_v_proj", "ff.net.0.proj", "ff.net.2"]  # cross_attn.k_img/v_img, img_emb.proj.1/.3


def test_module_table_is_the_real_transformer():
    """lora_names.wan_modules (torch-free, what preflight reasons about) lists exactly diffusers' modules."""
    for flavour, image in (("tiny", False), ("tiny-i2v-2.1", True), ("tiny-ti2v", False), ("tiny-i2v-2.2-high", False),
                           ("tiny-vace-2.1", False)):
        model = load_transformer(ModelConfig(flavour=flavour))
        real = [(n, type(m).__name__) for n, m in model.named_modules()]
        assert wan_modules(image, len(model.blocks), len(getattr(model, "vace_blocks", []) or [])) == real, flavour


def _adapted(flavour: str, targets: list[str], rank: int = 4, alpha: float = 6.0):
    """The flavour's transformer with a LoRA on `targets`, every LoRA weight random (as after training)."""
    model = load_transformer(ModelConfig(flavour=flavour))
    lora = LoraConfig(rank=rank, alpha=alpha, target_modules=targets)
    add_lora(model, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), lora


@pytest.mark.parametrize("flavour, targets", [
    ("tiny", DEFAULT_TARGET_MODULES + TOP_LEVEL),
    ("tiny-i2v-2.1", DEFAULT_TARGET_MODULES + TOP_LEVEL + IMAGE),
    ("tiny-i2v-2.1", ["attn1.to_q", "ff.net.0.proj", "ff.net.2"]),  # the image embedder alone beside one block layer
])
def test_every_target_loads_in_diffusers_and_comfyui_as_trained(flavour, targets, tmp_path):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    image = flavour == "tiny-i2v-2.1"
    cfg = config_from_dict({"datasets": [{"path": "x"}], "model": {"flavour": flavour},
                            "lora": {"rank": 4, "alpha": 6.0, "target_modules": targets}})
    assert interchange_problems(cfg) == []  # preflight lets it through...
    model, lora = _adapted(flavour, targets)
    with torch.no_grad():
        trained = model(**transformer_inputs(image))[0]
    path = save_adapter(model, get_peft_model_state_dict(model), tmp_path / "lora", lora, {})  # ...and it saves
    state = load_file(str(path))
    top = [k for k in state if not k.startswith("diffusion_model.blocks.")]
    assert top or targets == DEFAULT_TARGET_MODULES
    assert not any(k.endswith(".alpha") for k in top)  # alpha folded into lora_A where diffusers reads none
    if "ff.net.2" in targets:
        assert "diffusion_model.img_emb.proj.1.lora_A.weight" in state and "diffusion_model.img_emb.proj.3.lora_B.weight" in state

    def base():
        return load_transformer(ModelConfig(flavour=flavour)).eval()

    pipeline = WanImageToVideoPipeline if image else WanPipeline
    for file in (path, convert_lora(path, "diffusers", tmp_path / "d")):
        pipe = pipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=base())
        pipe.load_lora_weights(str(file), adapter_name="wanforge")  # diffusers' real loader, no key left over
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="wanforge")
        assert set(loaded) == set(get_peft_model_state_dict(model))
        with torch.no_grad():
            torch.testing.assert_close(pipe.transformer(**transformer_inputs(image))[0], trained, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # ComfyUI: original names, its update rule, merged into the original layout
        comfy = load_like_comfyui(base, state)(**transformer_inputs(image))[0]
    torch.testing.assert_close(comfy, trained, rtol=1e-4, atol=1e-5)
    assert (comfy - base()(**transformer_inputs(image))[0]).abs().max() > 1e-3  # the LoRA does something


def _problems(tmp_path, flavour="tiny", **lora):
    return interchange_problems(config_from_dict({"datasets": [{"path": "x"}], "model": {"flavour": flavour}, "lora": lora},
                                                 base_dir=tmp_path))


def test_preflight_names_every_target_that_cannot_be_saved(tmp_path):
    assert _problems(tmp_path) == [] and _problems(tmp_path, flavour="tiny-i2v-2.1", target_modules=IMAGE) == []
    assert "patch_embedding" in _problems(tmp_path, target_modules=["attn1.to_q", "patch_embedding"])[0]
    assert "matches no module" in _problems(tmp_path, target_modules=["add_k_proj"])[0]  # T2V has no image keys
    assert "go together" in _problems(tmp_path, flavour="tiny-i2v-2.1", target_modules=["to_q", "add_k_proj"])[0]
    assert "no transformer block" in _problems(tmp_path, target_modules=["proj_out"])[0]
    assert _problems(tmp_path, target_modules=["proj_out"], save_format="diffusers") == []
    assert "matches no module" in _problems(tmp_path, target_modules=["to_qq"])[0]


def test_preflight_side_needs_no_torch():
    code = ("import sys, trainer.outputs.export, trainer.model.lora_names; from trainer.model.lora_names import interchange_problems; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_self_check_refuses_files_a_loader_would_reject(tmp_path):
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    good = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a, "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b,
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}
    check_lora_file(good)
    bad = [
        {**good, "diffusion_model.head.head.lora_A.weight": a, "diffusion_model.head.head.lora_B.weight": b,
         "diffusion_model.head.head.alpha": torch.tensor(4.0)},  # diffusers leaves a top-level alpha over
        {k.replace("self_attn.q", "attn1.to_q"): v for k, v in good.items()},  # diffusers names: not ComfyUI's
        {k.replace("self_attn.q", "self_attn.norm_q"): v for k, v in good.items()},  # not a LoRA-able module
        {**good, "diffusion_model.blocks.0.self_attn.q.lora_A.weight": a * float("nan")},
        {"lora_unet_blocks_0_self_attn_q.lokr_w9": a},  # a suffix ComfyUI does not read
        {"lora_unet_blocks_0_attn1_to_q.lokr_w1": a},  # a diffusers module name in kohya form
        {"transformer.blocks.0.attn1.norm_q.lora_A.weight": a},
    ]
    for tensors in bad:
        with pytest.raises(LoRAFileError):
            check_lora_file(tensors)
    from trainer.outputs.export import _save

    with pytest.raises(LoRAFileError):  # nothing is published, not even a temp file
        _save(bad[0], tmp_path / INTERCHANGE_FILE, {})
    assert list(tmp_path.iterdir()) == []


def test_export_explains_lycoris_files(tmp_path):
    file = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.ones(2, 2)}, str(file))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "export", str(file), "--format", "diffusers"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "LoCon file also loads in diffusers" in proc.stderr and "Traceback" not in proc.stderr


def test_bfloat16_files_pass_the_self_check(tmp_path):
    model, lora = _adapted("tiny", DEFAULT_TARGET_MODULES + TOP_LEVEL, rank=4, alpha=3.0)
    lora = lora.model_copy(update={"save_dtype": "bfloat16"})
    path = save_adapter(model, get_peft_model_state_dict(model), tmp_path, lora, {})
    state = load_file(str(path))
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if not k.endswith(".alpha"))
