import pytest
import torch

from trainer.config.training import FlowConfig
from trainer.loop.flow import flow_loss, flow_target, noisy_input, sample_sigmas, timesteps_from_sigmas


def test_interpolation_and_target():
    x0, noise = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    s = torch.tensor([0.0, 0.25])
    xt = noisy_input(x0, noise, s)
    assert torch.equal(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(flow_target(x0, noise), noise - x0)
    assert torch.equal(timesteps_from_sigmas(s), torch.tensor([0.0, 250.0]))


def test_velocity_integrates_back_to_data():
    """Following the target velocity from s to 0 recovers x0: the sign convention is the scheduler's."""
    x0, noise = torch.randn(4, 5), torch.randn(4, 5)
    s = torch.full((4,), 0.7)
    xt = noisy_input(x0, noise, s)
    torch.testing.assert_close(xt - 0.7 * flow_target(x0, noise), x0)


@pytest.mark.parametrize("kind", ["logit_normal", "uniform", "shift"])
def test_sigma_distributions(kind):
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, FlowConfig(timestep_sampling=kind, shift=3.0), g)
    assert s.min() > 0 and s.max() < 1
    if kind == "logit_normal":
        assert abs(float(s.median()) - 0.5) < 0.02
    if kind == "uniform":
        assert abs(float(s.mean()) - 0.5) < 0.01
    if kind == "shift":  # shift > 1 moves mass to high noise: median of 3u/(1+2u) at u=0.5 is 0.75
        assert abs(float(s.median()) - 0.75) < 0.01


def test_logit_normal_mean_moves_the_distribution():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, FlowConfig(logit_mean=1.0), g)
    assert float(s.median()) == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.02)


def test_loss_is_fp32():
    a = torch.randn(8, dtype=torch.bfloat16)
    loss = flow_loss(a, torch.zeros(8, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (a.float() ** 2).mean())
