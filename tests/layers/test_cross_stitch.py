"""Cross-stitch units (Misra et al., CVPR 2016): x~_t = sum_u alpha_tu x_u, shared or per channel."""

from __future__ import annotations

import pytest
import torch

from mtl_med.layers import CrossStitch


def test_initial_alpha_rows_sum_to_one_with_the_self_weight_on_the_diagonal():
    a = CrossStitch(3, self_weight=0.9).alpha.detach()
    assert torch.allclose(a.diagonal(), torch.full((3,), 0.9))
    assert torch.allclose(a.sum(1), torch.ones(3))
    assert torch.allclose(a[0, 1], torch.tensor(0.05))


@pytest.mark.parametrize("per_channel", [False, True])
def test_output_is_the_alpha_weighted_sum_of_the_task_activations(per_channel):
    torch.manual_seed(0)
    unit = CrossStitch(3, num_channels=4, per_channel=per_channel)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn_like(unit.alpha))
    xs = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    out = unit(xs)
    for t in range(3):
        if per_channel:
            expected = sum(unit.alpha[t, u].view(1, 4, 1, 1) * xs[u] for u in range(3))
        else:
            expected = sum(unit.alpha[t, u] * xs[u] for u in range(3))
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-6)


def test_self_weight_one_is_the_identity_and_alpha_learns_from_every_task():
    xs = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    unit = CrossStitch(2, self_weight=1.0)
    out = unit(xs)
    assert all(torch.equal(o, x) for o, x in zip(out, xs))
    out[0].sum().backward()  # the loss of task 0 reaches alpha_01 (mixing in task 1) but not row 1
    g = unit.alpha.grad
    assert torch.allclose(g[0], torch.stack([xs[0].sum(), xs[1].sum()]).detach())
    assert torch.equal(g[1], torch.zeros(2))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        CrossStitch(1)
    with pytest.raises(ValueError, match="num_channels"):
        CrossStitch(2, per_channel=True)
    with pytest.raises(ValueError, match="expected 2 task activations"):
        CrossStitch(2)([torch.zeros(1)])


@pytest.mark.parametrize("per_channel", [False, True])
def test_mixes_bfloat16_activations_under_cpu_autocast(per_channel):
    # the posterior sampler runs deterministic baselines under bfloat16 autocast on CPUs that compute it natively
    unit = CrossStitch(2, 3, per_channel=per_channel)
    xs = [torch.randn(2, 3, 4, 4) for _ in range(2)]
    ref = unit(xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = unit([x.bfloat16() for x in xs])
    assert all(y.dtype == torch.bfloat16 for y in low)
    assert all(torch.allclose(a.float(), b, atol=0.05, rtol=0.05) for a, b in zip(low, ref))
