"""The saved LoRA loads where users load it: diffusers' load_lora_weights in both formats, original Wan names."""

import re
import subprocess
import sys

import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from conftest import tiny_config
from trainer.components import load_transformer, load_vae
from trainer.export import DIFFUSERS_FILE, INTERCHANGE_FILE, read_lora
from trainer.lora import add_lora
from trainer.train import train

RANK, ALPHA = 8, 4.0  # alpha != rank so a loader that ignores alpha gives a different output


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    cfg = tiny_config(clips, out / "run", train={"max_train_steps": 6}, optim={"learning_rate": 5e-3, "lr_warmup_steps": 0},
                      lora={"rank": RANK, "alpha": ALPHA}, validation={"at_end": False})
    result = train(cfg, show_progress=False)
    return cfg, result


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
        return_dict=False,
    )


@torch.no_grad()
def _trained_output(cfg, result):
    """The transformer exactly as training left it: base + the adapter from the last checkpoint."""
    model = load_transformer(cfg.model)
    add_lora(model, cfg.lora)
    ckpt = sorted((result.run_dir / "checkpoints").iterdir())[-1] / "adapter.safetensors"
    set_peft_model_state_dict(model, load_file(str(ckpt)))
    return model.eval()(**_inputs())[0]


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
        base_out = pipe.transformer(**_inputs())[0]
    pipe.load_lora_weights(str(path), adapter_name="wanforge")

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="wanforge")
    saved, _, _ = read_lora(result.lora_file)
    assert set(loaded) == set(saved)  # every saved tensor landed on a module, none was dropped

    with torch.no_grad():
        lora_out = pipe.transformer(**_inputs())[0]
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
