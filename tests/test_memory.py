"""Memory and speed options: each runs through the trainer on the tiny model and trains like the plain path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_config
from trainer.config.model import MemoryConfig
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.model.components import load_transformer
from trainer.model.lora import add_lora
from trainer.model.memory import apply_memory_options, place_base_model


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _run(clips, out, **memory) -> list[float]:
    cfg = tiny_config(clips, out, train={"max_train_steps": 3, "log_every_n_steps": 1}, memory=memory,
                      validation={"at_end": False, "every_n_steps": 1000})
    train(cfg, show_progress=False)
    return _losses(out)


@pytest.fixture(scope="module")
def plain_losses(clips, tmp_path_factory) -> list[float]:
    return _run(clips, tmp_path_factory.mktemp("plain") / "run", gradient_checkpointing="none")


@pytest.mark.parametrize(
    "memory",
    [
        {"gradient_checkpointing": "full"},
        {"gradient_checkpointing": "selective"},
        {"gradient_checkpointing": "selective", "checkpointed_blocks": 1},
        {"gradient_checkpointing": "none", "feed_forward_chunk_size": 7},
        {"gradient_checkpointing": "selective", "attention_backend": "_native_math"},
        {"gradient_checkpointing": "selective", "checkpoint_sublayers": True},
        {"gradient_checkpointing": "full", "checkpoint_sublayers": True, "activation_offload": True},
        {"gradient_checkpointing": "selective", "checkpointed_blocks": 1, "checkpoint_sublayers": True,
         "activation_offload": True},
        {"gradient_checkpointing": "full", "streamed_blocks": 1},
        {"gradient_checkpointing": "selective", "checkpoint_sublayers": True, "activation_offload": True,
         "streamed_blocks": 2},
    ],
    ids=["full", "selective", "partial", "ff-chunk", "math-attention", "sublayers", "sublayers-full-offload",
         "partial-sublayers-offload", "streamed-full", "streamed-sublayers-offload"],
)
def test_memory_option_trains_like_the_plain_path(clips, tmp_path, plain_losses, memory):
    """Exact options (recompute, chunking, backend) give the plain path's losses to float tolerance."""
    np.testing.assert_allclose(_run(clips, tmp_path / "run", **memory), plain_losses, rtol=1e-4)  # fp32 summation order differs under recompute


def test_the_16gb_preset_trains_close_to_bf16(clips, tmp_path, plain_losses, monkeypatch):
    """`low-16gb`'s settings through the trainer on the tiny model (both of its two blocks streamed; int8, full
    checkpointing, offload, FF chunks; compile off to keep the CPU test short) train like int8 does."""
    import trainer.model.memory as memory
    from trainer.model.presets import PRESETS

    streamed = []
    real = memory.stream_blocks
    monkeypatch.setattr(memory, "stream_blocks", lambda t, ids, device: streamed.append(ids) or real(t, ids, device))
    losses = _run(clips, tmp_path / "run", **{**PRESETS["low-16gb"], "compile": False, "streamed_blocks": 2})
    assert streamed == [[0, 1]]
    np.testing.assert_allclose(losses, plain_losses, rtol=2e-2)


def test_int8_base_weights_train_close_to_bf16(clips, tmp_path, plain_losses):
    """optimum-quanto int8 weights change the numbers slightly, never the trend: within 2% of the plain losses."""
    losses = _run(clips, tmp_path / "run", gradient_checkpointing="selective", base_quantization="int8")
    np.testing.assert_allclose(losses, plain_losses, rtol=2e-2)
    assert losses != plain_losses  # the base really was quantized


def test_four_bit_base_weights_are_refused():
    with pytest.raises(ValueError, match="4-bit"):
        MemoryConfig(base_quantization="nf4")


def test_unknown_attention_backend_names_the_field(tiny_model):
    transformer = load_transformer(tiny_model.model, torch.float32)
    with pytest.raises(UserError, match="memory.attention_backend.*did you mean \"_native_cudnn\""):
        apply_memory_options(transformer, MemoryConfig(attention_backend="native_cudnn"), torch.device("cpu"))


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name and args[0].shape[-2] == args[1].shape[-2]:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,expected_per_block", [("none", 1), ("full", 2), ("selective", 1)])
def test_selective_checkpointing_does_not_recompute_attention(tiny_model, mode, expected_per_block):
    """Self-attention runs once per block in a training step with "selective", twice with "full" recompute."""
    transformer = load_transformer(tiny_model.model, torch.float32)
    place_base_model(transformer, MemoryConfig(), torch.device("cpu"))
    add_lora(transformer, tiny_model.lora)
    apply_memory_options(transformer, MemoryConfig(gradient_checkpointing=mode), torch.device("cpu"))
    transformer.train()
    x = torch.randn(1, 16, 3, 8, 8)
    text = torch.randn(1, 6, transformer.config.text_dim)
    counter = _CountAttention()
    with counter:
        out = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
        out.square().mean().backward()
    assert counter.calls == expected_per_block * len(transformer.blocks)


@pytest.fixture
def tiny_model(clips, tmp_path):
    return tiny_config(clips, tmp_path / "unused")


def test_auto_preset_picks_by_gpu_memory_host_ram_and_keeps_explicit_fields():
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import resolve_memory
    from trainer.model.presets import preset_of

    big = get_flavour("t2v-480p-14b-2.1")
    on_80 = resolve_memory(MemoryConfig(preset="auto"), big, 80.0)
    assert preset_of(on_80) == "balanced" and on_80.checkpoint_sublayers and on_80.activation_offload
    # 50 GiB of offload does not go into 60% of 64 GiB free host RAM: the no-offload preset on an 80 GB card
    on_80_small_host = resolve_memory(MemoryConfig(preset="auto"), big, 80.0, host_gib=64.0)
    assert preset_of(on_80_small_host) == "fast" and not on_80_small_host.activation_offload
    on_48 = resolve_memory(MemoryConfig(preset="auto"), big, 48.0)
    assert preset_of(on_48) == "balanced" and on_48.activation_offload and on_48.base_quantization == "none"
    on_40 = resolve_memory(MemoryConfig(preset="auto"), big, 40.0)
    assert preset_of(on_40) == "low" and on_40.feed_forward_chunk_size
    on_24 = resolve_memory(MemoryConfig(preset="auto"), big, 24.0)
    assert preset_of(on_24) == "low-int8" and on_24.base_quantization == "int8" and not on_24.streamed_blocks
    # a 16 GB card: 30 of the 40 blocks stream their int8 weights from host RAM (issue 31)
    on_16 = resolve_memory(MemoryConfig(preset="auto"), big, 16.0, host_gib=48.0)
    assert preset_of(on_16) == "low-16gb" and on_16.streamed_blocks == 30 and on_16.base_quantization == "int8"
    assert on_16.gradient_checkpointing == "full" and on_16.activation_offload
    # 25 GiB of offload at 14B does not go into 30 GiB of free host RAM: no offload, int8 + full recompute instead
    small_host = resolve_memory(MemoryConfig(preset="auto"), big, 48.0, host_gib=30.0)
    assert preset_of(small_host) == "low-host-ram" and not small_host.activation_offload
    mine = resolve_memory(MemoryConfig(preset="auto", compile=False), big, 48.0)
    assert mine.compile is False and mine.activation_offload and preset_of(mine) is None
    assert resolve_memory(MemoryConfig(preset="none", compile=False), big, 48.0).activation_offload is False


def test_auto_preset_changes_nothing_on_cpu():
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import resolve_memory

    cfg = MemoryConfig()
    assert cfg.preset == "auto" and resolve_memory(cfg, get_flavour("t2v-480p-1.3b-2.1"), None) == cfg


def test_feed_forward_chunking_runs_the_ff_per_chunk_and_keeps_keys(tiny_model):
    from trainer.model.memory import enable_feed_forward_chunking

    transformer = load_transformer(tiny_model.model, torch.float32)
    keys = list(transformer.state_dict())
    ff = transformer.blocks[0].ffn
    x = torch.randn(1, 10, transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    expected = ff(x)
    enable_feed_forward_chunking(transformer, 4)
    calls = []
    ff.net[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    torch.testing.assert_close(ff(x), expected)
    assert calls == [4, 4, 2]
    assert list(transformer.state_dict()) == keys
    assert type(transformer.blocks[1].ffn) is type(ff)  # one class for every block: compile reuses one graph


@pytest.mark.parametrize("temb_dims", [3, 4], ids=["wan2.1", "ti2v-per-token"])
def test_sublayer_block_forward_is_diffusers_block_forward(tiny_model, temb_dims):
    """The sub-layer forward repeats diffusers' WanTransformerBlock math: same output and input gradients, exactly."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from trainer.model.memory import enable_sublayer_checkpointing

    transformer = load_transformer(tiny_model.model, torch.float32)
    block = transformer.blocks[0]
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, dim, generator=g, requires_grad=True)
    text = torch.randn(1, 6, dim, generator=g)
    temb = torch.randn(1, 6, dim, generator=g) if temb_dims == 3 else torch.randn(1, 48, 6, dim, generator=g)
    rotary = transformer.rope(torch.zeros(1, 16, 3, 8, 8))
    expected = WanTransformerBlock.forward(block, x, text, temb, rotary)
    (grad,) = torch.autograd.grad(expected.square().sum(), x)
    enable_sublayer_checkpointing(list(transformer.blocks), {0}, keep_attention=True)
    assert type(block).__name__ == "SublayerCheckpointedWanTransformerBlock"
    assert list(transformer.state_dict()) == list(load_transformer(tiny_model.model, torch.float32).state_dict())
    out = block(x, text, temb, rotary)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0], grad, rtol=0, atol=0)


def test_sublayers_without_checkpointing_are_refused():
    with pytest.raises(ValueError, match="checkpoint_sublayers needs gradient_checkpointing"):
        MemoryConfig(gradient_checkpointing="none", checkpoint_sublayers=True)


def test_host_memory_is_capped_by_the_container_cgroup(tmp_path):
    """A pod sees the whole machine in /proc/meminfo but is OOM-killed at its cgroup limit: the smaller one counts,
    with the cgroup's reclaimable page cache given back (v2 and v1 layouts; no limit set: meminfo alone)."""
    from trainer.model.sizing import _cgroup_free, host_memory_gib

    gib = 2**30
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{64 * gib}\n")
    (v2 / "memory.current").write_text(f"{40 * gib}\n")
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {4 * gib}\n")
    assert _cgroup_free(v2) == 28 * gib
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{32 * gib}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{30 * gib}\n")
    assert _cgroup_free(tmp_path / "v1") == 2 * gib
    unlimited = tmp_path / "none"
    unlimited.mkdir()
    (unlimited / "memory.max").write_text("max\n")
    (unlimited / "memory.current").write_text("5\n")
    assert _cgroup_free(unlimited) is None
    meminfo = {"MemTotal": 503 * gib, "MemAvailable": 480 * gib}
    assert host_memory_gib(meminfo, cgroup_free=28 * gib) == 28.0
    assert host_memory_gib(meminfo, cgroup_free=None) == 480.0


def test_auto_at_720p_14b_fits_the_host_ram_of_a_128_gib_node():
    """Wan 2.2 A14B at its default 1280x720x81 on an 80 GB GPU: `balanced` would offload ~115 GiB a step (what
    OOM-killed it on a 128 GiB node), so `auto` takes balanced-lean there (measured: 60 GiB host, 54 GiB GPU), and
    balanced only where the host has room for it."""
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import choose_preset, flavour_tokens
    from trainer.model.sizing import HOST_SHARE, flavour_shape, predict_memory

    for name in ("t2v-14b-2.2-high", "i2v-14b-2.2-low"):
        f = get_flavour(name)
        assert flavour_tokens(f) == 75600
        assert choose_preset(f, 79.2, host_gib=125.0) == "balanced-lean"
        lean = predict_memory(flavour_shape(name), "balanced-lean", 75600)
        assert lean.measured and lean.host_gib <= 0.5 * 128 and lean.offload_gib <= HOST_SHARE * 125
        assert predict_memory(flavour_shape(name), "balanced", 75600).offload_gib > HOST_SHARE * 125
        assert choose_preset(f, 79.2, host_gib=400.0) == "balanced"
    # a custom clip between the measured ones: scaled, and said to be
    assert not predict_memory(flavour_shape("t2v-14b-2.2-high"), "balanced-lean", 50000).measured


def test_run_json_records_which_memory_preset_ran_and_why():
    """run.json's `memory`: the preset asked for, the one that ran, and why (the node may choose unlike the laptop)."""
    from trainer.config.model import MemoryConfig
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import memory_choice, resolve_memory

    f = get_flavour("t2v-480p-1.3b-2.1")
    auto = MemoryConfig(preset="auto")
    on_h100 = memory_choice(auto, resolve_memory(auto, f, 79.2, host_gib=120, warn=False, processes=1), 79.2, 120)
    assert on_h100["requested"] == "auto" and on_h100["ran"] not in ("auto", "custom")
    assert "79 GiB GPU" in on_h100["why"] and "120 GiB host" in on_h100["why"]
    small = memory_choice(auto, resolve_memory(auto, f, 15.0, host_gib=12, warn=False, processes=1), 15.0, 12)
    assert small["ran"] != on_h100["ran"]  # another machine, another preset, and the record says so
    assert memory_choice(auto, auto, None, None)["why"].endswith("(CPU trial)")
    mixed = MemoryConfig(preset="low", attention_backend="native")
    record = memory_choice(mixed, resolve_memory(mixed, f, 79.2, warn=False), 79.2, 120)
    assert record["requested"] == "low" and "attention_backend" in record["why"] and '"low"' in record["why"]
