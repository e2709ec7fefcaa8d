import math

import pytest
import torch

from mtl_med.layers import ExponentialTemperature, StepTemperature, gumbel_softmax
from mtl_med.sharing.sfg.layers import StochasticFilterGroups


def _frequencies(groups, draws, generator):
    z = groups(batch_size=draws, generator=generator)  # per-example draws: (draws, K, T+1)
    return z.float().mean(0)


@pytest.mark.parametrize("training", [True, False])  # relaxed straight-through and exact sampling
def test_hard_samples_follow_p(training):
    p = torch.tensor([[0.2, 0.2, 0.6], [0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])
    groups = StochasticFilterGroups(3, 2, p, learnable=True, per_example=True).train(training)
    freq = _frequencies(groups, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(freq.sum(-1), torch.ones(3))  # one-hot rows
    assert torch.allclose(freq, p, atol=0.015)


def test_noise_on_p_does_not_follow_p():
    # the original code added Gumbel noise to p instead of log p: the draws are no longer Cat(p)
    p = torch.tensor([[0.1, 0.1, 0.8]])
    groups = StochasticFilterGroups(1, 2, p, learnable=False, per_example=True, noise="p").eval()
    freq = _frequencies(groups, 20000, torch.Generator().manual_seed(0))
    assert freq[0, 2] < 0.6


def test_same_seed_same_draws_and_seeds_differ():
    groups = StochasticFilterGroups(64, 3).train()
    a = groups(generator=torch.Generator().manual_seed(3))
    b = groups(generator=torch.Generator().manual_seed(3))
    c = groups(generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_straight_through_is_exactly_sparse_and_differentiable():
    logits = torch.randn(32, 3, requires_grad=True)
    z = gumbel_softmax(logits, tau=0.5, hard=True, generator=torch.Generator().manual_seed(0))
    assert ((z == 0) | (z > 0.99)).all() and torch.allclose(z.sum(-1), torch.ones(32))
    (z * torch.arange(3.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_argmax_inference_is_deterministic():
    groups = StochasticFilterGroups(5, 2, torch.tensor([0.1, 0.3, 0.6])).eval()
    groups.inference = "argmax"
    assert torch.equal(groups(), torch.tensor([[0.0, 0.0, 1.0]] * 5))


def test_exponential_schedule_values():
    s = ExponentialTemperature()  # A.1: tau = max(0.10, exp(-1e-5 t))
    assert s(0) == 1.0
    assert s(100_000) == pytest.approx(math.exp(-1.0))
    assert s(10**6) == 0.10
    assert [s.step() for _ in range(2)] == [pytest.approx(math.exp(-1e-5)), pytest.approx(math.exp(-2e-5))]
    t = ExponentialTemperature()
    t.load_state_dict(s.state_dict())
    assert t.value == s.value


def test_step_schedule_values():
    s = StepTemperature()  # AdaShare: tau0 = 5, x0.965 per alternation
    assert s(0) == 5.0 and s(10) == pytest.approx(5.0 * 0.965**10)
    with pytest.raises(ValueError):
        StepTemperature(factor=1.5)
