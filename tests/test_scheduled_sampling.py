"""Scheduled sampling: the probability schedule, the Euler rollout and the corrective target."""

from __future__ import annotations

import pytest
import torch

from trainer.config.training import ScheduledSamplingConfig
from trainer.loop.flow import flow_target, noisy_input
from trainer.loop.scheduled_sampling import MIN_SIGMA, apply_rollout, rollout_probability


class Oracle:
    """A predictor of the true velocity noise - x0 of each chosen sample: its rollout must be exact."""

    def __init__(self, x0, noise):
        self.x0, self.noise, self.calls = x0, noise, 0

    def __call__(self, x, s, chosen):
        self.calls += 1
        return (self.noise - self.x0)[chosen]


def biased(x, s, chosen):
    """A predictor whose velocity is a constant: its rollout drifts off the exact noising path."""
    return torch.full_like(x, 0.5)


def _batch(n=3):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(n, 4, 2, 3, 3, generator=g), torch.randn(n, 4, 2, 3, 3, generator=g)
    sigmas = torch.tensor([0.3, 0.6, 0.95][:n])
    return x0, noise, sigmas, g


def test_probability_ramp():
    cfg = ScheduledSamplingConfig(probability=0.5, probability_start=0.1, ramp_steps=100)
    assert rollout_probability(cfg, 0) == pytest.approx(0.1)
    assert rollout_probability(cfg, 50) == pytest.approx(0.3)
    assert rollout_probability(cfg, 100) == rollout_probability(cfg, 5000) == 0.5
    assert rollout_probability(ScheduledSamplingConfig(probability=0.2), 0) == 0.2


def test_off_consumes_no_randomness_and_changes_nothing():
    x0, noise, sigmas, g = _batch()
    noisy, target = noisy_input(x0, noise, sigmas), flow_target(x0, noise)
    state = g.get_state()
    out = apply_rollout(biased, ScheduledSamplingConfig(), 0, x0, noise, sigmas, noisy, target, g)
    assert out[0] is noisy and out[1] is target and out[2] == 0
    assert torch.equal(g.get_state(), state)


def test_exact_model_rolls_out_onto_the_noising_path():
    x0, noise, sigmas, g = _batch()
    noisy, target = noisy_input(x0, noise, sigmas), flow_target(x0, noise)
    oracle = Oracle(x0, noise)
    cfg = ScheduledSamplingConfig(probability=1.0, steps=3, sigma_offset=0.2)
    rolled, new_target, count = apply_rollout(oracle, cfg, 0, x0, noise, sigmas, noisy, target, g)
    assert count == 3 and oracle.calls == 3  # one batched call per Euler step
    assert torch.allclose(rolled, noisy, atol=1e-5)
    assert torch.allclose(new_target, target, atol=1e-4)


def test_drifting_model_gets_a_corrective_target():
    x0, noise, sigmas, g = _batch()
    sigmas[0] = MIN_SIGMA / 2  # too close to clean to roll out
    noisy, target = noisy_input(x0, noise, sigmas), flow_target(x0, noise)
    cfg = ScheduledSamplingConfig(probability=1.0, steps=4, sigma_offset=0.1)
    rolled, new_target, count = apply_rollout(biased, cfg, 0, x0, noise, sigmas, noisy, target, g)
    assert count == 2
    assert torch.equal(rolled[0], noisy[0]) and torch.equal(new_target[0], target[0])
    for i in (1, 2):
        s = float(sigmas[i])
        s_src = min(1.0, s + 0.1)
        start = (1 - s_src) * x0[i] + s_src * noise[i]
        expected = start + (s - s_src) * 0.5  # Euler with a constant velocity 0.5
        assert torch.allclose(rolled[i], expected, atol=1e-5)
        assert not torch.allclose(rolled[i], noisy[i], atol=1e-3)
        # following the target from the rolled input lands exactly on the clean latents
        assert torch.allclose(rolled[i] - s * new_target[i], x0[i], atol=1e-5)


def test_probability_selects_a_fraction_of_samples():
    x0 = torch.randn(400, 1, 1, 1, 1)
    noise = torch.randn_like(x0)
    sigmas = torch.full((400,), 0.5)
    g = torch.Generator().manual_seed(1)
    _, _, count = apply_rollout(biased, ScheduledSamplingConfig(probability=0.25, steps=1), 0, x0, noise, sigmas,
                                noisy_input(x0, noise, sigmas), flow_target(x0, noise), g)
    assert 70 <= count <= 130


def test_tiny_wan_rollout_through_the_step_extras(clips, tmp_path):
    """The real predictor (flavour inputs, tiny Wan): no gradient, shapes kept, target consistent with the input."""
    from conftest import tiny_config
    from trainer.loop.step_extras import StepExtras
    from trainer.model.components import load_transformer

    cfg = tiny_config(clips, tmp_path / "run", scheduled_sampling={"probability": 1.0, "steps": 2})
    model = load_transformer(cfg.model).train()
    extras = StepExtras.install(model, cfg, torch.device("cpu"), torch.float32)
    assert extras is not None and extras.router is None and extras.crepa is None
    x0, noise = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 16, 3, 8, 8)
    sigmas = torch.tensor([0.4, 0.7])
    text = torch.randn(2, 10, 32)
    batch = {"latents": x0, "text": text}
    noisy, target = noisy_input(x0, noise, sigmas), flow_target(x0, noise)
    g = torch.Generator().manual_seed(0)
    rolled, new_target = extras.before_forward(model, 0, batch, x0, noise, sigmas, noisy, target, text, g, torch.float32)
    assert extras.metrics["rollout_fraction"] == 1.0
    assert rolled.shape == noisy.shape and not rolled.requires_grad
    assert not torch.allclose(rolled, noisy)  # a random model does not follow the exact path
    assert torch.allclose(rolled - sigmas.view(-1, 1, 1, 1, 1) * new_target, x0, atol=1e-4)


@pytest.mark.parametrize("flavour", ["tiny-i2v-2.1", "tiny-ti2v"])
def test_rollout_and_tread_with_image_conditioned_inputs(flavour, tmp_path):
    """I2V (condition channels, CLIP tokens) and TI2V (per-token timesteps): the rollout feeds the flavour's inputs,
    and a TREAD route gathers TI2V's per-token time embeddings with the tokens."""
    from trainer.config.files import config_from_dict
    from trainer.data.conditioning import transformer_inputs
    from trainer.flavours import get_flavour
    from trainer.loop.step_extras import StepExtras
    from trainer.model.components import load_transformer

    cfg = config_from_dict({
        "model": {"flavour": flavour}, "datasets": [{"path": str(tmp_path)}],
        "tread": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 0}]},
        "scheduled_sampling": {"probability": 1.0, "steps": 2},
    })
    model = load_transformer(cfg.model).train()
    extras = StepExtras.install(model, cfg, torch.device("cpu"), torch.float32)
    c = model.config.out_channels
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, c, 3, 8, 8, generator=g), torch.randn(2, c, 3, 8, 8, generator=g)
    sigmas = torch.tensor([0.4, 0.7])
    text = torch.randn(2, 10, model.config.text_dim, generator=g)
    batch = {"latents": x0, "text": text}
    if model.config.in_channels > c:
        batch["condition"] = torch.randn(2, model.config.in_channels - c, 3, 8, 8, generator=g)
    if model.config.image_dim:
        batch["image_embeds"] = torch.randn(2, 257, model.config.image_dim, generator=g)
    noisy, target = extras.before_forward(model, 0, batch, x0, noise, sigmas, noisy_input(x0, noise, sigmas),
                                          flow_target(x0, noise), text, g, torch.float32)
    assert extras.metrics["rollout_fraction"] == 1.0 and not torch.allclose(noisy, noisy_input(x0, noise, sigmas))
    inputs = transformer_inputs(get_flavour(flavour), cfg.model, batch, x0, noisy, sigmas * 1000, "cpu", torch.float32)
    routed = model(**inputs, encoder_hidden_states=text, return_dict=False)[0]
    extras.router.clear()
    plain = model(**inputs, encoder_hidden_states=text, return_dict=False)[0]
    assert routed.shape == plain.shape == x0.shape and not torch.allclose(routed, plain)


def test_the_old_rollout_section_name_still_loads(clips, tmp_path, caplog):
    """`[rollout]` was the section's first name: such configs load as [scheduled_sampling], with a warning."""
    from conftest import tiny_config
    from trainer.config.files import config_from_dict, to_toml_dict

    data = to_toml_dict(tiny_config(clips, tmp_path / "run"))
    data.pop("scheduled_sampling", None)
    data["rollout"] = {"probability": 0.3, "steps": 2}
    cfg = config_from_dict(data)
    assert cfg.scheduled_sampling.probability == 0.3 and cfg.scheduled_sampling.steps == 2
    assert "[scheduled_sampling]" in caplog.text
