"""Activation offload: checkpointed blocks keep their saved tensors as copies elsewhere, and train exactly the same."""

from __future__ import annotations

import pytest
import torch

import trainer.model.offload as offload
from tests.conftest import tiny_config
from trainer.config.model import MemoryConfig
from trainer.model.components import load_transformer
from trainer.model.lora import add_lora, trainable_parameters
from trainer.model.memory import apply_memory_options, place_base_model


@pytest.fixture
def tiny_model(clips, tmp_path):
    return tiny_config(clips, tmp_path / "unused")


def _step(tiny, memory: MemoryConfig):
    """One forward + backward of the tiny Wan with these options: (output, LoRA gradients, offloader)."""
    transformer = load_transformer(tiny.model, torch.float32)
    place_base_model(transformer, memory, torch.device("cpu"))
    torch.manual_seed(0)
    add_lora(transformer, tiny.lora)
    for p in trainable_parameters(transformer):  # non-zero B so every adapter gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    offloader = apply_memory_options(transformer, memory, torch.device("cpu"))
    transformer.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 6, transformer.config.text_dim, generator=g)
    out = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
    out.square().mean().backward()
    grads = [p.grad.clone() for p in trainable_parameters(transformer)]
    return out.detach(), grads, offloader, transformer


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offload_gives_the_same_output_and_gradients(tiny_model, monkeypatch, mode):
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)  # the tiny model's activations are a few KB
    out, grads, none, _ = _step(tiny_model, MemoryConfig(gradient_checkpointing=mode))
    out_off, grads_off, offloader, transformer = _step(
        tiny_model, MemoryConfig(gradient_checkpointing=mode, activation_offload=True))
    assert none is None and offloader is not None
    torch.testing.assert_close(out_off, out, rtol=0, atol=0)
    assert len(grads_off) == len(grads) and all(g.abs().sum() > 0 for g in grads_off)
    for a, b in zip(grads_off, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert offloader.bytes_offloaded > 0


def test_shared_block_inputs_are_copied_once(tiny_model, monkeypatch):
    """Every block gets the same text states and timestep projection: one host copy each, not one per block; each
    block's own hidden-state input is one copy per block. (The rotary tables reach the block inside a tuple, which
    checkpointing keeps by reference: they stay on the device, ~33 MB at 1.3B.)"""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(offload, "KEEP_LAST_BLOCKS", 0)
    seen: list[torch.Tensor] = []
    real_copy = offload.ActivationOffloader._copy_to_host

    def spy(self, t):
        seen.append(t.detach().clone())
        return real_copy(self, t)

    monkeypatch.setattr(offload.ActivationOffloader, "_copy_to_host", spy)
    memory = MemoryConfig(gradient_checkpointing="full", activation_offload=True)
    out_off, grads_off, offloader, transformer = _step(tiny_model, memory)
    blocks = len(transformer.blocks)
    tokens = out_off.shape[2] * (out_off.shape[3] // 2) * (out_off.shape[4] // 2)
    hidden = [t for t in seen if t.shape[1] == tokens]
    assert blocks >= 2 and len(hidden) == blocks
    assert len(seen) - len(hidden) == 2  # text states + timestep projection, once for all blocks
    assert offloader.bytes_offloaded == sum(t.numel() * t.element_size() for t in seen)
    out, grads, _, _ = _step(tiny_model, MemoryConfig(gradient_checkpointing="full"))
    torch.testing.assert_close(out_off, out, rtol=0, atol=0)
    for a, b in zip(grads_off, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match="activation_offload needs gradient_checkpointing"):
        MemoryConfig(gradient_checkpointing="none", activation_offload=True)


def test_dense_check_keeps_strided_views_on_the_device():
    base = torch.zeros(4, 6, 8)
    assert offload._dense(base) and offload._dense(base.permute(2, 0, 1))
    assert not offload._dense(base[:, ::2]) and not offload._dense(base.expand(2, 4, 6, 8))


def test_compiled_blocks_offload_attention_outputs_too(tiny_model, monkeypatch):
    """With regional compile (the GPU presets), the compiled block saves its tensors through the same hooks: besides
    the inputs, the kept self-attention output goes to the host, and the step is unchanged."""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    selective = dict(gradient_checkpointing="selective")
    _, _, eager, _ = _step(tiny_model, MemoryConfig(**selective, activation_offload=True))
    out, grads, _, _ = _step(tiny_model, MemoryConfig(**selective, compile=True))
    out_off, grads_off, compiled, _ = _step(tiny_model, MemoryConfig(**selective, compile=True, activation_offload=True))
    torch.testing.assert_close(out_off, out, rtol=0, atol=0)
    for a, b in zip(grads_off, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # eager selective checkpointing keeps attention outputs in its own cache (not offloadable); compiled, they are saved
    # tensors of the compiled block: at least one more hidden-sized tensor per offloaded block
    tokens = out.shape[2] * (out.shape[3] // 2) * (out.shape[4] // 2)
    hidden_bytes = tokens * 32 * 4  # tokens x dim x fp32 (tiny Wan: dim 32)
    assert compiled.bytes_offloaded >= eager.bytes_offloaded + hidden_bytes


def test_int8_base_weights_are_never_offloaded(tiny_model, monkeypatch):
    """Backward keeps quanto's int8 weight data for the input gradients: it is the model's, not an activation."""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    dtypes: list[torch.dtype] = []
    real_copy = offload.ActivationOffloader._copy_to_host

    def spy(self, t):
        dtypes.append(t.dtype)
        return real_copy(self, t)

    monkeypatch.setattr(offload.ActivationOffloader, "_copy_to_host", spy)
    _step(tiny_model, MemoryConfig(gradient_checkpointing="selective", compile=True, activation_offload=True,
                                   base_quantization="int8"))
    assert dtypes and torch.int8 not in dtypes


def test_compiled_sublayer_checkpointing_keeps_and_offloads_the_sublayer_outputs(tiny_model, monkeypatch):
    """checkpoint_sublayers under compile: the same step, and each offloaded block now also keeps its two sub-layer
    outputs (the residual stream after self- and cross-attention) on the host."""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    base = dict(gradient_checkpointing="selective", compile=True, activation_offload=True)
    out, grads, whole, _ = _step(tiny_model, MemoryConfig(**base))
    out_sub, grads_sub, split, transformer = _step(tiny_model, MemoryConfig(**base, checkpoint_sublayers=True))
    assert type(transformer.blocks[0]).__name__ == "SublayerCheckpointedWanTransformerBlock"
    torch.testing.assert_close(out_sub, out, rtol=1e-5, atol=1e-6)  # separately compiled regions fuse differently
    for a, b in zip(grads_sub, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    tokens = out.shape[2] * (out.shape[3] // 2) * (out.shape[4] // 2)
    assert split.bytes_offloaded >= whole.bytes_offloaded + 2 * tokens * 32 * 4


def _mlp_step(offloader, blocks, x):
    """Forward + backward of checkpointed blocks, each in its offload group: (output, input gradient)."""
    from torch.utils.checkpoint import checkpoint

    x = x.clone().requires_grad_()
    h = x
    for i, block in enumerate(blocks):
        if offloader is None:
            h = checkpoint(block, h, use_reentrant=False)
        else:
            with offloader.group(i):
                h = checkpoint(block, h, use_reentrant=False)
    h.square().sum().backward()
    return h.detach(), x.grad


def test_host_budget_keeps_the_rest_on_the_device_and_the_step_unchanged():
    """Past `max_host_bytes` the saved tensors stay where they are (a 128 GiB node is not OOM-killed): the host holds
    no more than the budget, the rest is counted as kept, and output and gradients are exactly those of no offload."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(4)]
    x = torch.randn(32, 64)
    out, grad = _mlp_step(None, blocks, x)
    one_input = 32 * 64 * 4
    free = offload.ActivationOffloader(torch.device("cpu"), num_groups=4, keep_last=0, min_bytes=0)
    capped = offload.ActivationOffloader(torch.device("cpu"), num_groups=4, keep_last=0, min_bytes=0,
                                         max_host_bytes=3 * one_input)
    for off in (free, capped):
        out_off, grad_off = _mlp_step(off, blocks, x)
        torch.testing.assert_close(out_off, out, rtol=0, atol=0)
        torch.testing.assert_close(grad_off, grad, rtol=0, atol=0)
    assert free.bytes_kept_for_lack_of_host == 0 and free.bytes_offloaded > capped.max_host_bytes
    assert 0 < capped.bytes_offloaded <= capped.max_host_bytes
    assert capped.bytes_kept_for_lack_of_host == free.bytes_offloaded - capped.bytes_offloaded
    assert capped.pool.bytes <= capped.max_host_bytes


def test_a_full_host_budget_is_said_once(caplog):
    """Saved tensors kept on the GPU for lack of host RAM are the first suspect when a run runs out of GPU memory, so
    the next step says so, once per run; a budget that suffices says nothing."""
    blocks = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(4)]
    x = torch.randn(32, 64)
    capped = offload.ActivationOffloader(torch.device("cpu"), num_groups=4, keep_last=0, min_bytes=0,
                                         max_host_bytes=3 * 32 * 64 * 4)
    free = offload.ActivationOffloader(torch.device("cpu"), num_groups=4, keep_last=0, min_bytes=0)
    with caplog.at_level("WARNING", logger="trainer.model.offload"):
        for _ in range(3):
            _mlp_step(capped, blocks, x)
            _mlp_step(free, blocks, x)
    said = [r.getMessage() for r in caplog.records if "host budget" in r.getMessage()]
    assert len(said) == 1 and "stayed on the GPU" in said[0]


def test_host_buffers_are_exact_size_and_reused_every_step():
    """The pool holds exactly the bytes one step offloads (no power-of-two rounding), and a second step with the same
    shapes reuses them instead of allocating more."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.GELU()) for _ in range(3)]
    x = torch.randn(17, 48)  # 17 x 48 x 4 bytes: not a power of two
    off = offload.ActivationOffloader(torch.device("cpu"), num_groups=3, keep_last=0, min_bytes=0)
    first, _ = _mlp_step(off, blocks, x)
    held = off.pool.bytes
    assert held == off.bytes_offloaded and held % 1024 != 0
    second, _ = _mlp_step(off, blocks, x)
    assert off.pool.bytes == held and off.bytes_offloaded == held
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_buffers_of_other_clip_shapes_are_dropped_to_stay_within_the_budget():
    """Bucketed datasets change the saved shapes from step to step: the pool drops buffers of sizes the step no
    longer uses instead of growing past the host budget."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(3)]
    budget = 3 * 40 * 32 * 4 * 2  # a step of 40-token clips: 2 saved tensors per block
    off = offload.ActivationOffloader(torch.device("cpu"), num_groups=3, keep_last=0, min_bytes=0,
                                      max_host_bytes=budget)
    for tokens in (40, 37, 40, 33):
        _mlp_step(off, blocks, torch.randn(tokens, 32))
        assert off.pool.bytes <= budget and off.bytes_kept_for_lack_of_host == 0
