"""Weight streaming (`memory.streamed_blocks`, trainer/model/streaming.py): streamed blocks keep their frozen weights
in host RAM and compute with them from a ring of device slots. A training step gives exactly the output and LoRA
gradients of the same step with every weight resident: streaming only copies bits, and the same kernels run on the
same values (so the comparisons are exact, rtol = atol = 0)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import trainer.model.offload as offload
import trainer.model.streaming as streaming
from trainer.config.model import LoraConfig, MemoryConfig
from trainer.model.lora import add_lora, trainable_parameters
from trainer.model.memory import apply_memory_options, place_base_model
from trainer.model.offload import plain_tensors
from trainer.model.tiny import ensure_tiny_model

LAYERS = 5  # the tiny Wan with more blocks than slots: within one step the ring is reused by different blocks
CPU = torch.device("cpu")


def _transformer(memory: MemoryConfig, device: torch.device = CPU, dtype=torch.float32, layers: int = LAYERS,
                 lora: LoraConfig | None = None):
    """The tiny Wan (trainer/model/tiny.py's config, `layers` blocks, seeded weights) with LoRA and these options."""
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(ensure_tiny_model() / "transformer")
    torch.manual_seed(0)
    transformer = WanTransformer3DModel.from_config({**config, "num_layers": layers}).to(dtype)
    place_base_model(transformer, memory, device)
    torch.manual_seed(1)
    add_lora(transformer, lora or LoraConfig(rank=4))
    for p in trainable_parameters(transformer):  # non-zero B: every adapter gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    transformer.offloader = apply_memory_options(transformer, memory, device)
    transformer.train()
    return transformer


def _step(transformer, device: torch.device = CPU):
    """One forward + backward: (output, LoRA gradients); the gradients are cleared for the next step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g).to(device, transformer.dtype)
    text = torch.randn(1, 6, transformer.config.text_dim, generator=g).to(device, transformer.dtype)
    out = transformer(hidden_states=x, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
                      return_dict=False)[0]
    out.float().square().mean().backward()
    grads = [p.grad.clone() for p in trainable_parameters(transformer)]
    for p in trainable_parameters(transformer):
        p.grad = None
    return out.detach(), grads


def _assert_same(a, b) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert len(a[1]) == len(b[1]) and all(g.abs().sum() > 0 for g in b[1])
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


MODES = {
    "full": dict(gradient_checkpointing="full"),
    "selective": dict(gradient_checkpointing="selective"),
    "full-sublayers": dict(gradient_checkpointing="full", checkpoint_sublayers=True),
    "selective-sublayers-offload": dict(gradient_checkpointing="selective", checkpoint_sublayers=True,
                                        activation_offload=True),
    "int8-selective": dict(gradient_checkpointing="selective", base_quantization="int8"),
    "int8-full-offload-ffchunk": dict(gradient_checkpointing="full", base_quantization="int8",
                                      activation_offload=True, feed_forward_chunk_size=7),
    "partial": dict(gradient_checkpointing="selective", checkpointed_blocks=3),
}


CASES = [("full", False), ("full", True), ("selective", False), ("full-sublayers", True),
         ("selective-sublayers-offload", False), ("selective-sublayers-offload", True), ("int8-selective", True),
         ("int8-full-offload-ffchunk", False), ("int8-full-offload-ffchunk", True), ("partial", False)]


@pytest.mark.parametrize("mode,check_released", CASES,
                         ids=[f"{m}-{'released-slots-poisoned' if c else 'ring'}" for m, c in CASES])
def test_streamed_step_is_the_resident_step(monkeypatch, mode, check_released):
    """Same output and LoRA gradients, two steps in a row (the second reuses slots the first left filled). With
    released slots poisoned (NaN / garbage and forgotten), any computation still reading a slot after its block let
    it go, or reading another block's weights, would change the numbers."""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(streaming, "CHECK_RELEASED_SLOTS", check_released)
    values = MODES[mode]
    resident = _transformer(MemoryConfig(**values))
    expected = _step(resident)
    transformer = _transformer(MemoryConfig(**values, streamed_blocks=4))
    streamer = transformer.wanforge_streamer
    assert len(streamer.ids) == min(4, values.get("checkpointed_blocks", LAYERS))
    assert len(streamer.ids) > streaming.SLOTS  # the ring really is reused within a step
    for _ in range(2):
        _assert_same(expected, _step(transformer))
        assert streamer.bound_blocks() == []


def test_lycoris_adapters_stream_the_same_step(monkeypatch, tmp_path):
    """A LyCORIS network (LoKr) reads the base weights inside the blocks too: the same exact step."""
    import json

    monkeypatch.setattr(streaming, "CHECK_RELEASED_SLOTS", True)
    config = tmp_path / "lycoris.json"
    config.write_text(json.dumps({"algo": "lokr", "factor": 4, "linear_dim": 4, "linear_alpha": 2}))
    lora = LoraConfig(lora_type="lycoris", lycoris_config=str(config))
    expected = _step(_transformer(MemoryConfig(gradient_checkpointing="full"), lora=lora))
    transformer = _transformer(MemoryConfig(gradient_checkpointing="full", streamed_blocks=4), lora=lora)
    for _ in range(2):
        _assert_same(expected, _step(transformer))


class _Watch(TorchDispatchMode):
    """Every op of a step: none but the slot copies reads a host copy of streamed weights; whatever reads a slot reads
    a bound one holding exactly its block's weights; at most one block is bound at a time."""

    def __init__(self, streamer):
        super().__init__()
        self.streamer = streamer
        self.host = {t.untyped_storage().data_ptr(): i for i, b in streamer._blocks.items() for t in b.host}
        self.slots = {t.untyped_storage().data_ptr(): (s, k) for s in streamer._slots for k, t in enumerate(s.tensors)}
        self.slot_reads = 0
        self.copies_into_slots = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [inner for t in tree_leaves((args, kwargs or {})) if torch.is_tensor(t) for inner in plain_tensors(t)]
        ptrs = [t.untyped_storage().data_ptr() for t in tensors]
        assert len(self.streamer.bound_blocks()) <= 1
        if func is torch.ops.aten.copy_.default and ptrs[1] in self.host:
            assert ptrs[0] in self.slots, "a host copy of streamed weights went somewhere other than a slot"
            self.copies_into_slots += 1
        else:
            assert not any(p in self.host for p in ptrs), f"{func} computed with weights in host RAM"
            for t, p in zip(tensors, ptrs):
                if p in self.slots:
                    slot, k = self.slots[p]
                    assert slot.bound, f"{func} read a slot no block holds"
                    host = self.streamer._blocks[slot.block].host[k]  # the same view of its block's host copy
                    assert torch.equal(t, host.as_strided(t.shape, t.stride(), host.storage_offset() + t.storage_offset()))
                    self.slot_reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["full", "selective-sublayers-offload", "int8-selective"])
def test_blocks_compute_only_with_their_own_bound_slot(monkeypatch, mode):
    """Which tensors live where during a step, op by op (forward, recompute and backward), and in which order the
    blocks are bound: forward in order, backward in reverse."""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    transformer = _transformer(MemoryConfig(**MODES[mode], streamed_blocks=3))
    streamer = transformer.wanforge_streamer
    binds = []
    real_bind = streamer._bind
    monkeypatch.setattr(streamer, "_bind", lambda i, slot: (binds.append((i, streaming.in_backward())),
                                                            real_bind(i, slot)))
    watch = _Watch(streamer)
    with watch:
        _step(transformer)
    assert binds == [(i, False) for i in streamer.ids] + [(i, True) for i in reversed(streamer.ids)]
    assert watch.slot_reads > 0 and watch.copies_into_slots > 0
    leaves = [t for b in streamer._blocks.values() for t in b.leaves]
    hosts = [t for b in streamer._blocks.values() for t in b.host]
    assert all(t.data_ptr() == h.data_ptr() for t, h in zip(leaves, hosts))  # idle again: weights in host RAM
    # the device holds SLOTS blocks' worth of streamed weights, whatever the number of streamed blocks
    per_block = sum(t.numel() * t.element_size() for t in streamer._blocks[streamer.ids[0]].host)
    assert streamer.device_bytes == streaming.SLOTS * per_block and streamer.host_bytes >= 3 * per_block
    resident = [i for i in range(LAYERS) if i not in streamer.ids]
    assert all(not streamer.streams(i) for i in resident) and resident
    for i in resident:  # never touched
        assert all(p.data_ptr() not in watch.host and p.data_ptr() not in watch.slots
                   for p in transformer.blocks[i].parameters())


def test_the_ring_copies_each_block_twice_a_step_less_the_turnarounds():
    """Forward and backward each copy every streamed block once, except the two blocks still in the slots where the
    order turns (the forward's last blocks are the backward's first, and the other way round): 2N - 4 copies per step
    once the ring is warm (N = 4 streamed blocks, 2 slots)."""
    transformer = _transformer(MemoryConfig(gradient_checkpointing="full", streamed_blocks=4))
    streamer = transformer.wanforge_streamer
    per_block = sum(t.numel() * t.element_size() for t in streamer._blocks[streamer.ids[0]].host)
    _step(transformer)
    for _ in range(2):
        _step(transformer)
        assert streamer.bytes_copied == (2 * 4 - 2 * streaming.SLOTS) * per_block


def test_compiled_blocks_stream_the_same_step(monkeypatch):
    """With regional compile (every GPU preset), the binding stays outside the compiled block and the compiled
    backward reads the weights bound when it runs (int8: the weights' inner tensors); the offload leaves the slots
    alone, although the compiled blocks save the weights they read for backward."""
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(streaming, "CHECK_RELEASED_SLOTS", True)
    values = dict(gradient_checkpointing="selective", compile=True, activation_offload=True, base_quantization="int8")
    torch._dynamo.reset()
    resident = _transformer(MemoryConfig(**values), layers=3)
    expected = _step(resident)
    transformer = _transformer(MemoryConfig(**values, streamed_blocks=3), layers=3)
    for _ in range(2):
        _assert_same(expected, _step(transformer))
    assert transformer.offloader.bytes_offloaded == resident.offloader.bytes_offloaded > 0


def test_no_grad_forward_streams_through_the_hooks():
    """Validation and eval loss call the blocks themselves under no_grad: the blocks' hooks bind and release them."""
    memory = MemoryConfig(gradient_checkpointing="full")
    resident, transformer = _transformer(memory), _transformer(memory.model_copy(update={"streamed_blocks": 4}))
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 6, resident.config.text_dim, generator=g)
    with torch.no_grad():
        want = resident(hidden_states=x, timestep=torch.tensor([10.0]), encoder_hidden_states=text, return_dict=False)[0]
        got = transformer(hidden_states=x, timestep=torch.tensor([10.0]), encoder_hidden_states=text,
                          return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert transformer.wanforge_streamer.bound_blocks() == []


def test_validation_compiled_blocks_bind_the_streamed_weights(monkeypatch):
    """Validation renders run the blocks through one compiled function shared by every block (resident ones traced
    first here): a streamed block is still bound around its compiled call, so it computes from its slot."""
    from trainer.outputs.validation_videos import compiled_blocks

    memory = MemoryConfig(gradient_checkpointing="full")
    resident, transformer = _transformer(memory), _transformer(memory.model_copy(update={"streamed_blocks": 4}))
    streamer = transformer.wanforge_streamer
    binds = []
    real_bind = streamer._bind
    monkeypatch.setattr(streamer, "_bind", lambda i, slot: (binds.append(i), real_bind(i, slot)))
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 6, resident.config.text_dim, generator=g)
    outputs = []
    for model in (resident, transformer):
        model.eval()
        with torch.no_grad(), compiled_blocks([model]):
            outputs.append(model(hidden_states=x, timestep=torch.tensor([10.0]), encoder_hidden_states=text,
                                 return_dict=False)[0])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    assert binds == streamer.ids and streamer.bound_blocks() == []


def test_moving_the_model_leaves_streamed_weights_in_host_ram():
    """accelerate's prepare (and any `.to`) moves the rest of the model; the streamed weights stay in their host
    buffers, and DDP is told to leave them alone (frozen, identical in every process)."""
    transformer = _transformer(MemoryConfig(gradient_checkpointing="full", streamed_blocks=2))
    streamer = transformer.wanforge_streamer
    streamed = {id(getattr(m, n)) for b in streamer._blocks.values() for m, n in b.params}
    names = [n for n, p in transformer.named_parameters() if id(p) in streamed]
    assert transformer._ddp_params_and_buffers_to_ignore == names and names
    keys = list(transformer.state_dict())
    before = {n: p.detach().clone() for n, p in transformer.named_parameters() if id(p) in streamed}
    transformer.to("meta")
    for name, p in transformer.named_parameters():
        assert (p.device.type == "cpu") == (id(p) in streamed), name
        if id(p) in streamed:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    assert list(transformer.state_dict()) == keys


def test_only_checkpointed_blocks_stream_spread_over_them():
    from trainer.model.streaming import streamed_block_ids

    assert streamed_block_ids(list(range(40)), 30)[:4] == [0, 1, 2, 4] and len(streamed_block_ids(list(range(40)), 30)) == 30
    assert streamed_block_ids(list(range(40)), 4) == [0, 10, 20, 30]
    assert streamed_block_ids([0, 1, 2], 30) == [0, 1, 2]
    assert streamed_block_ids(list(range(40)), None) == [] == streamed_block_ids([], 3)
    with pytest.raises(ValueError, match="streamed_blocks needs gradient_checkpointing"):
        MemoryConfig(gradient_checkpointing="none", streamed_blocks=4)
    assert MemoryConfig(streamed_blocks=0).streamed_blocks is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_gpu_streaming_is_exact_pinned_and_frees_the_device(monkeypatch, quantization):
    """On a GPU (bf16 / int8 base, autocast, activation offload, side streams): the same step as resident, the host
    copies page-locked, and the device holding the resident blocks plus two slots. Exact where the resident step is
    bitwise reproducible on this GPU (torch's math attention), else within bf16 rounding."""
    device = torch.device("cuda")
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    values = dict(gradient_checkpointing="selective", activation_offload=True, base_quantization=quantization,
                  attention_backend="_native_math")

    def build(memory):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        transformer = _transformer(memory, device, torch.bfloat16, layers=6)
        return transformer, torch.cuda.memory_allocated() - before

    def step(transformer):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _step(transformer, device)

    resident, resident_bytes = build(MemoryConfig(**values))
    expected, again = step(resident), step(resident)
    exact = torch.equal(expected[0], again[0]) and all(torch.equal(a, b) for a, b in zip(expected[1], again[1]))
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1.6e-2, atol=1e-5)
    del resident
    torch.cuda.empty_cache()
    for check_released in (False, True):
        monkeypatch.setattr(streaming, "CHECK_RELEASED_SLOTS", check_released)
        transformer, streamed_bytes = build(MemoryConfig(**values, streamed_blocks=5))
        streamer = transformer.wanforge_streamer
        per_block = sum(t.numel() * t.element_size() for t in streamer._blocks[streamer.ids[0]].host)
        assert all(h.is_pinned() for b in streamer._blocks.values() for h in b.host)
        assert resident_bytes - streamed_bytes >= 0.8 * (5 - streaming.SLOTS) * per_block
        for _ in range(2):
            got = step(transformer)
            torch.testing.assert_close(got[0], expected[0], **tolerance)
            for a, b in zip(got[1], expected[1]):
                torch.testing.assert_close(a, b, **tolerance)
        torch.cuda.synchronize()
        assert streamer.bytes_copied > 0 and streamer.bound_blocks() == []
        assert all(t.device.type == "cpu" for b in streamer._blocks.values() for t in b.leaves)
        del transformer, streamer
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the sizing model, `auto`, preflight


def test_sizing_moves_streamed_weights_from_the_gpu_to_host_ram():
    """GPU weights: all blocks but the streamed ones, plus two slots; host: the streamed blocks' weights. The 16 GB
    preset at 14B 832x480x81 is predicted under 15 GiB GPU and 32 GiB host, and says it was not measured."""
    from trainer.model.sizing import HOST_SHARE, flavour_shape, predict_memory, streamed_gib, weights_gib

    shape = flavour_shape("t2v-480p-14b-2.1")
    block = shape.block_params / 2**30
    assert weights_gib(shape, "int8") - weights_gib(shape, "int8", streamed=30) == pytest.approx(28 * block)
    assert weights_gib(shape, "none", streamed=1) == weights_gib(shape, "none")  # one block: no smaller than its slots
    assert streamed_gib(shape, "int8", streamed=30) == pytest.approx(30 * block)
    tokens = shape.tokens(81, 480, 832)
    p, basis = predict_memory(shape, "low-16gb", tokens), predict_memory(shape, "low-int8", tokens)
    assert p.gpu_gib < 15 and p.host_gib <= 32 and p.pinned_gib <= HOST_SHARE * 48
    assert p.gpu_gib == pytest.approx(basis.gpu_gib - 28 * block, abs=0.02)  # the same activations as low-int8's row
    assert p.offload_gib == pytest.approx(basis.offload_gib / 2, abs=0.02)  # full checkpointing keeps the input only
    assert p.streamed_gib == pytest.approx(30 * block, abs=0.01) and not p.measured and not p.gpu_measured


def test_auto_takes_the_16gb_preset_only_where_it_is_needed_and_can_run():
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import choose_preset

    big, small = get_flavour("t2v-480p-14b-2.1"), get_flavour("t2v-480p-1.3b-2.1")
    assert choose_preset(big, 16.0, host_gib=48.0) == "low-16gb"
    assert choose_preset(big, 24.0, host_gib=48.0) == "low-int8"  # no streaming where the weights fit
    assert choose_preset(small, 16.0, host_gib=48.0) != "low-16gb"
    assert choose_preset(big, 16.0, host_gib=48.0, streaming=False, warn=False) != "low-16gb"  # a Wan 2.2 pair
    assert choose_preset(big, 16.0, host_gib=48.0, base_quantization="fp8", warn=False) != "low-16gb"
    assert choose_preset(big, 16.0, host_gib=24.0, warn=False) != "low-16gb"  # 22.5 GiB pinned: not in 60% of 24


def test_estimate_on_a_16gb_card_names_the_streaming_preset_as_extrapolated():
    from launcher.estimate import estimate
    from trainer.config.files import config_from_dict

    cfg = config_from_dict({"model": {"flavour": "t2v-480p-14b-2.1"},
                            "datasets": [{"path": "/x", "num_frames": 81, "width": 832, "height": 480}]})
    e = estimate(cfg, "RTX4080")
    assert e.memory_preset == "low-16gb" and e.fits and not e.measured and not e.speed_measured
    assert e.vram_gib < 15 and e.host_gib <= 32 and "not measured (extrapolated)" in e.line()
    assert "low-16gb has no measured row yet" in e.basis
    both = config_from_dict({"model": {"flavour": "t2v-14b-2.2-high", "train_both_experts": True},
                             "datasets": [{"path": "/x", "num_frames": 81, "width": 832, "height": 480}]})
    assert estimate(both, "RTX4080").memory_preset != "low-16gb"


def test_preflight_refuses_streaming_more_than_the_host_ram_holds(clips, tmp_path, monkeypatch):
    """The streamed weights are page-locked host RAM the run cannot do without: `check` on the machine says so with a
    count that fits."""
    import trainer.model.sizing as sizing
    from tests.conftest import tiny_config
    from trainer.preflight.check import preflight

    cfg = tiny_config(clips, tmp_path / "run", memory={"gradient_checkpointing": "full", "streamed_blocks": 2})
    per_block = sizing.streamed_gib(sizing.flavour_shape("tiny"), "none", "bfloat16", 1)
    monkeypatch.setattr(sizing, "host_memory_gib", lambda *a, **k: 1.5 * per_block / 0.9)
    errors = [e for e in preflight(cfg, scan=False).errors if "streamed_blocks" in e]
    assert errors == [e for e in errors if "memory.streamed_blocks = 1 (more weights stay on the GPU)" in e] != []
    monkeypatch.setattr(sizing, "host_memory_gib", lambda *a, **k: 64.0)
    assert not [e for e in preflight(cfg, scan=False).errors if "streamed_blocks" in e]
