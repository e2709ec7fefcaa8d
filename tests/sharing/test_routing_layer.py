"""Task Routing Layer: masks, sharing ratio, gradients, state, task sampling and grouping by task
(the network-level properties are in tests/sharing/test_routing.py)."""

import pytest
import torch
from monai.networks.layers.factories import Act, Conv, Norm

from mtl_med.layers.tasks import TaskSampler, split_by_task
from mtl_med.sharing.routing.layer import TaskRouting, routing_masks


@pytest.mark.parametrize("act", ["prelu", "leakyrelu"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masked_channel_gets_exactly_zero_gradient(act, spatial_dims):
    torch.manual_seed(0)
    conv = Conv[Conv.CONV, spatial_dims](2, 8, 3, padding=1)
    bn = Norm[Norm.BATCH, spatial_dims](8)
    trl = TaskRouting(8, num_tasks=3, sigma=0.25, seed=1)
    f = Act[act]()
    x = torch.randn(4, 2, *([6] * spatial_dims))
    task = 2
    y = f(trl(bn(conv(x)), task))
    (y * torch.randn_like(y)).sum().backward()
    mask = trl.masks[task]
    assert (~mask).any() and mask.any()
    grad = conv.weight.grad.flatten(1)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(conv.bias.grad[~mask] == 0)
    assert torch.all(bn.weight.grad[~mask] == 0) and torch.all(bn.bias.grad[~mask] == 0)
    assert (grad[mask].abs().sum(1) > 0).all()


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_mask_rows_have_the_zeros_sigma_implies(sigma):
    c, t = 16, 4
    m = routing_masks(t, c, sigma, torch.Generator().manual_seed(0))
    n_spec = c - round(sigma * c)
    expected_zeros = n_spec - n_spec // t  # n_spec divisible by t here
    assert m.shape == (t, c) and m.dtype == torch.bool
    assert ((~m).sum(1) == expected_zeros).all()
    # shared units are used by every task, the others by exactly one
    users = m.sum(0)
    assert int((users == t).sum()) == round(sigma * c)
    assert int((users == 1).sum()) == n_spec or t == 1


def test_sigma_zero_gives_disjoint_subnetworks_and_sigma_one_hard_sharing():
    m0 = routing_masks(5, 20, 0.0, torch.Generator().manual_seed(1))
    assert (m0.sum(0) == 1).all() and (m0.sum(1) == 4).all()
    assert routing_masks(5, 20, 1.0).all()


@pytest.mark.parametrize("tasks,units,sigma", [(312, 16, 0.0), (312, 64, 0.4), (3, 2, 0.0), (7, 10, 0.3), (1, 5, 0.0)])
def test_every_unit_used_by_at_least_one_task(tasks, units, sigma):
    m = routing_masks(tasks, units, sigma, torch.Generator().manual_seed(2))
    assert m.any(0).all()
    assert m.any(1).all()  # and every task has at least one unit


def test_masks_that_leave_a_unit_unused_are_rejected():
    masks = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="at least one task"):
        TaskRouting(3, 2, masks=masks)
    with pytest.raises(ValueError, match="sigma"):
        TaskRouting(3, 2, sigma=1.5)


def test_task_sampler_is_seeded_and_covers_tasks():
    s1, s2 = TaskSampler(10, seed=3), TaskSampler(10, seed=3)
    draws = [s1.sample() for _ in range(200)]
    assert draws == [s2.sample() for _ in range(200)]
    assert set(draws) == set(range(10))
    ids = TaskSampler(4, seed=0).sample(16)
    assert ids.shape == (16,) and ids.dtype == torch.long
    state = s1.state_dict()
    a = s1.sample(8)
    s1.load_state_dict(state)
    assert torch.equal(a, s1.sample(8))


def test_split_by_task_groups_targets_in_batch_order():
    ids = torch.tensor([2, 0, 2, 1, 0])
    targets = {"a": torch.arange(5), "b": torch.arange(5) * 10, "c": torch.arange(5) * 100}
    grouped = split_by_task(targets, ids, ["a", "b", "c"])
    assert grouped["c"].tolist() == [0, 200] and grouped["b"].tolist() == [30] and grouped["a"].tolist() == [1, 4]


def test_knockout_convention_of_the_authors_code():
    # each task zeroes int(sigma * C) units of its own, drawn independently: subsets of tasks share units
    m = routing_masks(4, 30, 0.5, torch.Generator().manual_seed(0), convention="knockout")
    assert (~m).sum(1).tolist() == [15] * 4
    assert len({tuple(r.tolist()) for r in m}) == 4  # independent draws
    users = m.sum(0)
    assert set(users.tolist()) - {4, 0} and (users < 4).any()  # units shared by some tasks only
    assert routing_masks(3, 7, 0.0, convention="knockout").all()  # sigma = 0: hard sharing
    assert (~routing_masks(3, 7, 0.5, convention="knockout")).sum(1).tolist() == [3] * 3  # int(), as the code
    same = routing_masks(4, 30, 0.5, torch.Generator().manual_seed(0), convention="knockout")
    assert torch.equal(m, same)
    m = routing_masks(10, 4, 0.75, torch.Generator().manual_seed(0), convention="knockout")
    layer = TaskRouting(4, 10, masks=m, convention="knockout")  # a unit unused by every task is allowed here
    assert layer.masks.sum(1).tolist() == [1] * 10
    with pytest.raises(ValueError, match="convention"):
        routing_masks(2, 4, 0.5, convention="code")
