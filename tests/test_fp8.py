"""fp8 base weights (trainer/fp8.py): the fp8 matmuls compute what they claim, only the adapter trains, and a tiny run
trains close to the bf16/fp32 path. The CPU runs torch._scaled_mm, so this is the same code the GPU runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from trainer.config.model import MemoryConfig
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.model.fp8 import FP8, Float8FrozenLinear, check_float8_device, quantize_rows, to_float8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -400.0], [0.0, 0.0, 0.0]])
    values, scale = quantize_rows(x)
    assert values.dtype == FP8
    assert values.float().abs().amax(dim=1)[:2].tolist() == [448.0, 448.0]  # each row's max lands on e4m3's max
    torch.testing.assert_close(values.float() * scale, x, rtol=0.07, atol=1e-6)
    assert torch.isfinite(scale).all() and (values[2].float() == 0).all()  # an all-zero row stays zero, no NaN


def test_fp8_linear_forward_and_input_gradient_are_the_quantized_matmuls():
    """Forward = Q(x) @ Q(W).T (+ bias) and dx = Q(dy) @ Q(W) with per-row scales, to fp32 rounding; the frozen weight
    gets no gradient. And both stay within fp8's error of the exact layer."""
    torch.manual_seed(0)
    exact = nn.Linear(64, 48)
    layer = nn.Linear(64, 48)
    layer.load_state_dict(exact.state_dict())
    layer.requires_grad_(False)
    to_float8(layer)
    assert isinstance(layer, Float8FrozenLinear) and layer.weight.dtype == FP8

    x = torch.randn(2, 37, 64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    xq, xs = quantize_rows(x.detach().reshape(-1, 64))
    expected = (xq.float() * xs) @ layer.dequantized_weight().t() + layer.bias
    torch.testing.assert_close(y.detach().reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    gq, gs = quantize_rows(grad.reshape(-1, 48))
    w_for_grad = layer.weight_t.float() * layer.weight_t_scale.t()  # (in, out), scaled per input column
    torch.testing.assert_close(x.grad.reshape(-1, 64), (gq.float() * gs) @ w_for_grad.t(), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None

    x_exact = x.detach().clone().requires_grad_(True)
    y_exact = exact(x_exact)
    y_exact.backward(grad)
    assert _rel(y, y_exact) < 0.06 and _rel(x.grad, x_exact.grad) < 0.06
    assert _rel(y, y_exact) > 1e-3  # really quantized


def test_fp8_layers_in_bf16_give_bf16_outputs_and_adapters_stay_fp32(clips, tmp_path):
    from trainer.model.components import load_transformer
    from trainer.model.lora import add_lora, trainable_parameters
    from trainer.model.memory import apply_memory_options, place_base_model

    cfg = tiny_config(clips, tmp_path / "unused", memory={"base_quantization": "fp8"})
    transformer = load_transformer(cfg.model, torch.bfloat16)
    place_base_model(transformer, cfg.memory, torch.device("cpu"))
    fp8_layers = [m for m in transformer.modules() if isinstance(m, Float8FrozenLinear)]
    per_block = sum(isinstance(m, nn.Linear) for m in transformer.blocks[0].modules())
    assert len(fp8_layers) == per_block * len(transformer.blocks)
    assert not isinstance(transformer.proj_out, Float8FrozenLinear)  # outside the blocks: unchanged
    torch.manual_seed(0)
    add_lora(transformer, cfg.lora)
    apply_memory_options(transformer, cfg.memory, torch.device("cpu"))
    params = trainable_parameters(transformer)
    assert params and all(p.dtype == torch.float32 for p in params)
    lora_a = transformer.blocks[0].attn1.to_q.lora_A["default"].weight
    assert lora_a.float().unique().numel() > 256  # kaiming init, not rounded through fp8 (peft reads compute_dtype)
    out = transformer.blocks[0].attn1.to_q.base_layer(torch.randn(1, 5, lora_a.shape[1], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_fp8_base_weights_train_close_to_the_plain_path(clips, tmp_path):
    def losses(run, **memory):
        cfg = tiny_config(clips, run, train={"max_train_steps": 3, "log_every_n_steps": 1}, memory=memory,
                          validation={"at_end": False, "every_n_steps": 1000})
        train(cfg, show_progress=False)
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    plain = losses(tmp_path / "plain", gradient_checkpointing="selective")
    fp8 = losses(tmp_path / "fp8", gradient_checkpointing="selective", base_quantization="fp8")
    assert len(fp8) == len(plain) == 3
    np.testing.assert_allclose(fp8, plain, rtol=5e-2)
    assert fp8 != plain


def test_fp8_names_are_accepted_and_old_gpus_are_refused(monkeypatch):
    assert MemoryConfig(base_quantization="fp8-torchao").base_quantization == "fp8"
    check_float8_device(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError, match='base_quantization = "fp8" needs fp8 matmuls.*A100.*sm_80'):
        check_float8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_device(torch.device("cuda"))


def test_fp8_with_lycoris_is_refused_with_the_fix(clips, tmp_path):
    lycoris = tmp_path / "lycoris.json"
    lycoris.write_text(json.dumps({"algo": "lokr", "factor": 4}))
    for memory in ({"base_quantization": "fp8"}, {"preset": "balanced-fp8"}):
        with pytest.raises(UserError, match='lora.lora_type = "lora" only.*set lora.lora_type = "lora", or memory.*to keep LyCORIS'):
            tiny_config(clips, tmp_path / "run", memory=memory,
                        lora={"lora_type": "lycoris", "lycoris_config": str(lycoris)})


def test_auto_never_picks_fp8_and_counts_fp8_weights_at_two_bytes():
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import choose_preset, estimated_peak_gib, resolve_memory

    big = get_flavour("t2v-480p-14b-2.1")
    for gpu in (24.0, 48.0, 80.0, 141.0):
        assert choose_preset(big, gpu) != "balanced-fp8"
    named = resolve_memory(MemoryConfig(preset="balanced-fp8"), big, 80.0)
    assert named.base_quantization == "fp8" and named.activation_offload and named.checkpoint_sublayers
    tokens = 21 * 30 * 52
    int8 = estimated_peak_gib(big, "low-int8", tokens)
    as_fp8 = estimated_peak_gib(big, "low-int8", tokens, base_quantization="fp8")
    assert as_fp8 - int8 == pytest.approx(13.0, abs=0.5)  # ~14e9 weights, one byte more each
    # 24 GB card, fp8 set by the user: low-int8 no longer fits with two-byte weights, so auto says so and takes the smallest
    assert resolve_memory(MemoryConfig(preset="auto", base_quantization="fp8"), big, 24.0).base_quantization == "fp8"
    assert choose_preset(big, 24.0, base_quantization="fp8") == min(
        ["balanced", "fast", "low", "low-int8", "low-host-ram"],
        key=lambda name: estimated_peak_gib(big, name, tokens, base_quantization="fp8"))


def test_estimate_uses_the_fp8_rows_and_refuses_gpus_without_fp8():
    from launcher.estimate import estimate
    from trainer.config.files import config_from_dict

    def cfg(flavour):
        return config_from_dict({"model": {"flavour": flavour}, "memory": {"preset": "balanced-fp8"},
                                 "datasets": [{"path": "/x", "num_frames": 81, "width": 832, "height": 480}],
                                 "lora": {"rank": 16}})

    h100 = estimate(cfg("t2v-480p-14b-2.1"), "H100")
    assert h100.memory_preset == "balanced-fp8" and h100.fits
    assert h100.s_per_step == pytest.approx(7.851, rel=1e-3) and h100.vram_gib == pytest.approx(38.55, abs=0.3)
    small = estimate(cfg("t2v-480p-1.3b-2.1"), "H100")
    assert small.s_per_step == pytest.approx(1.703, rel=1e-3)  # the newest balanced-fp8 row (issue 31)
    a100 = estimate(cfg("t2v-480p-1.3b-2.1"), "A100-80GB")
    assert not a100.fits and "fp8 base weights need an Ada, Hopper or Blackwell GPU" in a100.basis


@pytest.mark.parametrize("model", [{"flavour": "tiny-i2v-2.1"},
                                   {"flavour": "tiny-t2v-2.2-high", "train_both_experts": True,
                                    "expert_switch_every_n_steps": 1}], ids=["i2v", "two-experts"])
def test_fp8_trains_resumes_and_renders_other_architectures(few_clips, tmp_path, monkeypatch, model):
    """I2V (image key/value projections too) and both Wan 2.2 experts (quantized on the CPU, moved to the GPU later):
    fp8 layers in every block, a checkpoint resumes, validation renders through the fp8 layers."""
    import trainer.model.memory as memory

    converted = []
    original = memory.convert_blocks_to_float8
    monkeypatch.setattr(memory, "convert_blocks_to_float8", lambda t: converted.append(original(t)) or converted[-1])
    cfg = tiny_config(few_clips, tmp_path / "run", model=model, memory={"base_quantization": "fp8"},
                      train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2},
                      validation={"num_inference_steps": 2, "eval_every_n_steps": 0})
    train(cfg, show_progress=False)
    cfg.train.max_train_steps = 3
    result = train(cfg, resume="latest", show_progress=False)
    assert result.final_step == 3 and result.videos and result.lora_file.stat().st_size > 0
    experts = 2 if model.get("train_both_experts") else 1
    assert len(converted) == 2 * experts and min(converted) >= 2 * 8  # 2 blocks x (8 attention + 2 FF, I2V 2 more)
