"""train_both_experts: the experts trade places through the page-locked idle slot without losing or mixing weights."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.config.model import LoraConfig
from trainer.model.experts import ExpertPair, frozen_tensors, select_expert
from trainer.model.lora import add_lora, trainable_parameters
from trainer.model.tiny import _tiny_transformer

CPU = torch.device("cpu")


def _expert(seed: int):
    torch.manual_seed(seed)
    model = _tiny_transformer(16, 16)
    model.requires_grad_(False)
    add_lora(model, LoraConfig(rank=4))
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.normal_(0, 0.1)  # a LoRA that changes the output, so a mixed-up expert would show
    return model


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pair(device: torch.device = CPU):
    high, low = _expert(1), _expert(2)
    reference = {"high": copy.deepcopy(high).eval(), "low": copy.deepcopy(low).eval()}
    pair = ExpertPair(high, low)
    optimizer = torch.optim.AdamW(trainable_parameters(pair), lr=1e-3)
    pair.attach_optimizer(optimizer)
    pair.activate("high", device)
    return pair, reference, optimizer


def _views(pair) -> set[int]:
    return {v.data_ptr() for v in pair._slot.views}


def test_swaps_keep_each_expert_its_own_weights_and_identity():
    pair, reference, optimizer = _pair()
    states = {stage: _state(reference[stage]) for stage in ("high", "low")}
    identities = {stage: [id(p) for p in pair.expert(stage).parameters()] for stage in ("high", "low")}
    assert pair._slot is not None and pair._slot.holds(frozen_tensors(pair.low))
    for stage in ("low", "high", "low", "high", "low"):
        select_expert(pair, stage, CPU)
        assert pair.active == stage
        other = "high" if stage == "low" else "low"
        assert pair._slot.holds(frozen_tensors(pair.expert(other)))  # the idle one waits in the slot
        assert not {t.data_ptr() for t in frozen_tensors(pair.expert(stage))} & _views(pair)  # the active one is not
        for name in ("high", "low"):
            assert [id(p) for p in pair.expert(name).parameters()] == identities[name]
            now = _state(pair.expert(name))
            assert now.keys() == states[name].keys()
            assert all(torch.equal(now[k], states[name][k]) for k in now), f"{name} weights changed after {stage}"
        pair.eval()
        with torch.no_grad():
            assert torch.equal(pair(**_inputs())[0], reference[stage](**_inputs())[0])
    # training the active expert's LoRA between swaps moves only that expert, and its optimizer state follows it
    pair.train()
    loss = pair(**_inputs())[0].square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trained = _state(pair.low)
    select_expert(pair, "high", CPU)
    select_expert(pair, "low", CPU)
    assert all(torch.equal(v, trained[k]) for k, v in _state(pair.low).items())
    assert all(optimizer.state[p] for p in trainable_parameters(pair.low))
    assert not any(optimizer.state.get(p) for p in trainable_parameters(pair.high))


def test_an_idle_expert_left_outside_the_slot_goes_back_before_the_next_step():
    """Validation renders with both experts on the device; the next training step puts the idle one back."""
    pair, reference, _ = _pair()
    for t in frozen_tensors(pair.low):  # as `Module.to(device)` leaves it: its own tensors, not the slot's
        t.data = t.data.clone()
    assert not pair.settled("high", CPU)
    select_expert(pair, "high", CPU)
    assert pair.settled("high", CPU) and pair._slot.holds(frozen_tensors(pair.low))
    expected = _state(reference["low"])
    assert all(torch.equal(v, expected[k]) for k, v in _state(pair.low).items())


def test_experts_of_different_layouts_move_without_the_slot():
    """A base the slot cannot hold (here one tensor in another dtype, as int8 / fp8 bases differ) still swaps."""
    high, low = _expert(1), _expert(2)
    low.patch_embedding.weight.data = low.patch_embedding.weight.data.double()
    expected = _state(low)
    pair = ExpertPair(high, low)
    pair.activate("high", CPU)
    assert pair._slot is None
    select_expert(pair, "low", CPU)
    assert pair.active == "low" and all(torch.equal(v, expected[k]) for k, v in _state(pair.low).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_swaps_on_the_gpu_match_the_cpu_reference():
    device = torch.device("cuda")
    pair, reference, _ = _pair(device)
    for stage in ("low", "high", "low"):
        select_expert(pair, stage, device)
        torch.cuda.synchronize()
        expected = _state(reference[stage])
        assert all(torch.equal(v.cpu(), expected[k]) for k, v in _state(pair.expert(stage)).items())


def test_both_experts_share_one_offload_pool_and_never_offload_their_moved_weights():
    """With activation offload, each swap re-registers the incoming expert's weights (new addresses) as never to be
    offloaded (compiled backward graphs save them), and both experts draw on one pinned pool under one host cap."""
    from trainer.config.model import MemoryConfig
    from trainer.model.experts import assemble_pair
    from trainer.model.trainable import make_trainable

    memory = MemoryConfig(gradient_checkpointing="selective", activation_offload=True)
    experts, offloaders = {}, {}
    for stage, seed in (("high", 1), ("low", 2)):
        torch.manual_seed(seed)
        experts[stage] = _tiny_transformer(16, 16)
        offloaders[stage] = make_trainable(experts[stage], LoraConfig(rank=4), memory, CPU, CPU)
    pair = assemble_pair(experts, offloaders, "tiny-t2v-2.2-high", CPU)
    assert offloaders["low"].pool is offloaders["high"].pool
    assert offloaders["low"].max_host_bytes == offloaders["high"].max_host_bytes is not None
    for stage in ("low", "high", "low"):
        select_expert(pair, stage, CPU)
        weights = {t.untyped_storage().data_ptr() for t in pair.expert(stage).parameters()}
        assert weights <= offloaders[stage]._excluded
        pair.train()
        pair(**_inputs())[0].square().mean().backward()  # a step through the offloading block runner


def test_a_swap_cut_short_is_completed_by_the_next_one():
    """An exchange that stopped halfway (an error mid-copy) leaves some tensors moved and some not: the next one moves
    exactly the rest, so no expert ends up with the other's weights."""
    pair, reference, _ = _pair()
    low = frozen_tensors(pair.low)
    for t in low[: len(low) // 2]:  # half of the idle expert already out of the slot
        t.data = t.data.clone()
    select_expert(pair, "low", CPU)
    select_expert(pair, "high", CPU)
    select_expert(pair, "low", CPU)
    for stage in ("high", "low"):
        expected = _state(reference[stage])
        assert all(torch.equal(v, expected[k]) for k, v in _state(pair.expert(stage)).items()), stage


def test_the_estimate_and_auto_count_the_idle_expert_in_host_ram(tmp_path):
    """train_both_experts keeps the other expert's weights in host RAM: the estimate adds them to the host peak and
    leaves the offload only the rest of the node's RAM."""
    from launcher.estimate import estimate
    from trainer.config.files import config_from_dict
    from trainer.model.sizing import flavour_shape, idle_expert_gib

    def cfg(both: bool):
        return config_from_dict({"model": {"flavour": "t2v-14b-2.2-high", "train_both_experts": both},
                                 "datasets": [{"path": str(tmp_path)}]})

    idle = flavour_shape("t2v-14b-2.2-high").params * 2 / 2**30  # bf16 weights
    assert idle_expert_gib(cfg(False)) == 0 and idle_expert_gib(cfg(True)) == pytest.approx(idle)
    one, both = estimate(cfg(False), "H100"), estimate(cfg(True), "H100")
    assert both.memory_preset == one.memory_preset and both.vram_gib == one.vram_gib
    assert both.host_gib == pytest.approx(one.host_gib + idle, abs=0.1)
    assert "idle expert" in both.basis and "idle expert" not in one.basis
    assert one.measured and not both.measured  # no row measured a two-expert run's host memory
