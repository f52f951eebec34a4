"""FlashAttention 4 wiring: the custom ops, diffusers' flash_4_hub backend, selective checkpointing and compile.

The real kernels need a Hopper/Blackwell GPU. Here a stand-in `flash_attn.cute.interface` module implements the two
entry points the wrapper calls the way the kernels do: the forward returns the output and the log-sum-exp in
(batch, heads, seq) layout, and the backward computes the gradients from that log-sum-exp (not with autograd), so a
wrong layout, scale or argument order in the wrapper shows up as wrong numbers.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from trainer.config.model import MemoryConfig
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.model.attention import flash_attn_4
from trainer.model.components import load_transformer
from trainer.model.lora import add_lora
from trainer.model.memory import apply_memory_options, place_base_model


def _scores(q, k, scale):
    return torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale


def _fwd(q, k, v, softmax_scale=None, return_lse=False, **_):
    s = _scores(q, k, softmax_scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.float())
    return out.to(q.dtype), lse, None, None, None


def _bwd(q, k, v, out, dout, lse, softmax_scale, causal, softcap, **_):
    p = torch.exp(_scores(q, k, softmax_scale) - lse[..., None])
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout.float())
    dp = torch.einsum("bqhd,bkhd->bhqk", dout.float(), v.float())
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (b, h, q)
    ds = p * (dp - delta[..., None]) * softmax_scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.float())
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Kernels:
    def __init__(self):
        self.forward_calls = 0

    def fwd(self, *args, **kwargs):
        self.forward_calls += 1
        return _fwd(*args, **kwargs)


@pytest.fixture
def fake_fa4(monkeypatch) -> _Kernels:
    kernels = _Kernels()
    for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=name != "flash_attn.cute.interface")
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["flash_attn.cute.interface"]._flash_attn_fwd = kernels.fwd
    sys.modules["flash_attn.cute.interface"]._flash_attn_bwd = _bwd
    return kernels


@pytest.mark.parametrize("kv_len", [24, 7], ids=["self", "cross"])
def test_flash_attn_4_matches_sdpa_forward_and_backward(fake_fa4, kv_len):
    torch.manual_seed(0)
    q = torch.randn(2, 24, 3, 16, requires_grad=True)
    k = torch.randn(2, kv_len, 3, 16, requires_grad=True)
    v = torch.randn(2, kv_len, 3, 16, requires_grad=True)
    out = flash_attn_4(q, k, v)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    want = torch.autograd.grad(ref_out, (q, k, v), grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_flash_attn_4_casts_to_the_autocast_dtype_and_refuses_fp32(fake_fa4):
    q, k = (torch.randn(1, 10, 2, 8) for _ in range(2))
    v = torch.randn(1, 10, 2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attn_4(q, k, v)  # fp32 q/k (RMSNorm with fp32 weights) next to a bf16 v
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), flash_attn_4(q.bfloat16(), k.bfloat16(), v).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="bf16 or fp16"):  # on a GPU (meta tensors stand in: no kernel runs)
        flash_attn_4(*(t.float().to("meta") for t in (q, k, v)))


def test_flash_attn_4_is_one_op_under_compile(fake_fa4):
    """fullgraph=True fails on any graph break: the kernels stay opaque to dynamo, forward and backward."""
    q, k, v = (torch.randn(1, 10, 2, 8, requires_grad=True) for _ in range(3))

    def step(a, b, c):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return flash_attn_4(a * 2, b, c).float().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(q, k, v).backward()
    assert q.grad is not None and fake_fa4.forward_calls == 1


def _transformer(tiny_model, mode: str, backend: str):
    transformer = load_transformer(tiny_model.model, torch.float32)
    place_base_model(transformer, MemoryConfig(), torch.device("cpu"))
    add_lora(transformer, tiny_model.lora)
    apply_memory_options(transformer, MemoryConfig(gradient_checkpointing=mode, attention_backend=backend),
                         torch.device("cpu"))
    return transformer.train()


def test_flash_4_backend_gives_sdpa_gradients_and_selective_keeps_its_output(tiny_model, fake_fa4):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8)
    results = []
    for backend in ("native", "flash_4_hub"):
        torch.manual_seed(1)
        transformer = _transformer(tiny_model, "selective", backend)
        text = torch.randn(1, 6, transformer.config.text_dim, generator=torch.Generator().manual_seed(2))
        out = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                          return_dict=False)[0]
        out.square().mean().backward()
        grads = [p.grad.clone() for p in transformer.parameters() if p.requires_grad]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    blocks = len(transformer.blocks)
    # self- and cross-attention once each per block; selective checkpointing re-runs only cross-attention
    assert fake_fa4.forward_calls == 3 * blocks


def test_flash_4_trains_like_the_plain_path(clips, tmp_path, fake_fa4):
    def losses(out, backend):
        cfg = tiny_config(clips, out, train={"max_train_steps": 3, "log_every_n_steps": 1},
                          memory={"gradient_checkpointing": "selective", "attention_backend": backend},
                          validation={"at_end": False, "every_n_steps": 1000})
        train(cfg, show_progress=False)
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    np.testing.assert_allclose(losses(tmp_path / "fa4", "flash_4_hub"), losses(tmp_path / "sdpa", "native"), rtol=1e-4)


def test_flash_4_without_the_package_says_how_to_get_it(tiny_model, monkeypatch):
    monkeypatch.setattr("trainer.model.attention.flash_attn_4_installed", lambda: False)
    monkeypatch.setattr("diffusers.models.attention_dispatch.is_kernels_available", lambda: False)
    transformer = load_transformer(tiny_model.model, torch.float32)
    with pytest.raises(UserError, match=r'memory.attention_backend = "flash_4_hub".*pip install flash-attn-4'):
        apply_memory_options(transformer, MemoryConfig(attention_backend="flash_4_hub"), torch.device("cpu"))


@pytest.fixture
def tiny_model(clips, tmp_path):
    return tiny_config(clips, tmp_path / "unused")


@pytest.mark.parametrize("capability,installed,expected", [
    ((9, 0), True, "flash_4_hub"),
    ((9, 0), False, "_native_cudnn"),
    ((8, 0), True, "_native_cudnn"),
    ((10, 0), True, "flash_4_hub"),
    ((12, 0), True, "_native_cudnn"),
])
def test_auto_takes_flash_attn_4_on_hopper_when_installed(fake_fa4, monkeypatch, capability, installed, expected):
    from trainer.model.attention import resolve_attention_backend

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("trainer.model.attention.flash_attn_4_installed", lambda: installed)
    assert resolve_attention_backend("auto", torch.device("cuda", 0)) == expected
    assert resolve_attention_backend("_native_flash", torch.device("cuda", 0)) == "_native_flash"
    assert resolve_attention_backend("auto", torch.device("cpu")) == "native"


def test_a_broken_flash_attn_4_install_falls_back_under_auto_and_is_named_when_asked_for(
        fake_fa4, monkeypatch, tiny_model, caplog):
    from trainer.model.attention import resolve_attention_backend

    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)  # its import now fails, as without the DSL
    monkeypatch.setattr("trainer.model.attention._SAID", set())  # nothing said yet in this process
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_attention_backend("auto", torch.device("cuda", 0)) == "_native_cudnn"
    assert "does not import" in caplog.text
    assert resolve_attention_backend("auto", torch.device("cuda", 0)) == "_native_cudnn"  # validation asks again
    assert caplog.text.count("does not import") == 1  # said once, with why
    transformer = load_transformer(tiny_model.model, torch.float32)
    with pytest.raises(UserError, match=r'"flash_4_hub": flash-attn-4 is installed but does not import'):
        apply_memory_options(transformer, MemoryConfig(attention_backend="flash_4_hub"), torch.device("cpu"))
