import pytest
import torch

from mtl_med.sharing.sfg.layers import SFGConv, StochasticFilterGroups, grouping_init


def test_grouping_init_modes():
    assert torch.allclose(grouping_init(4, 2, "sfg"), torch.tensor([[0.2, 0.2, 0.6]] * 4))  # A.1
    assert torch.allclose(grouping_init(2, 3, "sfg", 0.4), torch.tensor([[0.2, 0.2, 0.2, 0.4]] * 2))
    assert torch.allclose(grouping_init(2, 2, "constant_p"), torch.full((2, 3), 1 / 3))
    mask = grouping_init(9, 2, "constant_mask")
    assert torch.equal(mask.sum(0), torch.tensor([3.0, 3.0, 3.0]))
    with pytest.raises(ValueError):
        grouping_init(4, 2, "bogus")
    # the paper's single-task, hard-sharing and cross-stitch baselines are registered methods, not groupings
    for mode in ("hard_sharing", "single_task", "cross_stitch"):
        with pytest.raises(ValueError, match="unknown sharing mode"):
            grouping_init(4, 2, mode)


def test_learned_probabilities_start_at_p_init_and_stay_normalised():
    groups = StochasticFilterGroups(6, 2, grouping_init(6, 2))
    assert torch.allclose(groups.probabilities, torch.tensor([[0.2, 0.2, 0.6]] * 6), atol=1e-6)
    with torch.no_grad():
        groups.theta.normal_(0, 5)
    p = groups.probabilities
    assert (p > 0).all() and torch.allclose(p.sum(-1), torch.ones(6))


def _streams(batch=2, c=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size, size, generator=g) for _ in range(3)]


@pytest.mark.parametrize("merge", ["sum", "concat"])
def test_routing_task_group_never_sees_other_task(merge):
    layer = SFGConv(2, 6, 9, merge=merge).eval()
    layer.groups.fix(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    f1, f2, fs = _streams()
    out = layer([f1, f2, fs])
    out_f2 = layer([f1, f2 + 1.0, fs])  # change the task-2 stream only
    assert torch.equal(out[0], out_f2[0]) and torch.equal(out[2], out_f2[2])
    assert not torch.equal(out[1], out_f2[1])
    out_fs = layer([f1, f2, fs + 1.0])  # the shared stream reaches every group
    assert all(not torch.equal(a, b) for a, b in zip(out, out_fs))


def test_streams_are_zero_outside_their_group():
    layer = SFGConv(3, 1, 6, first=True).train()
    assignment = torch.tensor([2, 0, 1, 2, 0, 1])
    layer.groups.fix(assignment)
    out = layer(torch.randn(2, 1, 5, 5, 5))
    for g, f in enumerate(out):
        assert f[:, assignment != g].abs().sum() == 0
        assert f[:, assignment == g].abs().sum() > 0


def test_per_example_assignments_differ_across_the_batch():
    layer = SFGConv(2, 1, 16, first=True, per_example=True, mode="constant_p").eval()
    out, z = layer(torch.randn(4, 1, 6, 6), torch.Generator().manual_seed(0), return_mask=True)
    assert z.shape == (4, 16, 3)
    assert not torch.equal(z[0], z[1])


def test_first_layer_rejects_streams_and_later_layers_reject_tensors():
    with pytest.raises(TypeError):
        SFGConv(2, 1, 4, first=True)(_streams(c=1))
    with pytest.raises(TypeError):
        SFGConv(2, 4, 4)(torch.randn(1, 4, 4, 4))


def test_section_5_4_starts_dirichlet_and_constant_mask():
    torch.manual_seed(0)
    p = grouping_init(50, 2, "sfg", shared_init="dirichlet")
    assert p.shape == (50, 3) and torch.allclose(p.sum(-1), torch.ones(50))
    assert p.std(0).min() > 0.1  # drawn per kernel, not one row repeated
    assert torch.equal(grouping_init(6, 2, "sfg", shared_init="constant_mask"), grouping_init(6, 2, "constant_mask"))
    layer = SFGConv(2, 1, 6, num_tasks=2, first=True, mode="sfg", shared_init="constant_mask")
    assert layer.groups.learnable and (layer.groups.probabilities.argmax(-1) == torch.tensor([0, 0, 1, 1, 2, 2])).all()
    with pytest.raises(ValueError, match="dirichlet"):
        grouping_init(4, 2, "sfg", shared_init="uniform")
