"""Task Routing Layer: masks, sharing ratio, gradients, state and task selection."""

import pytest
import torch
from monai.networks.layers.factories import Act, Conv, Norm

from mtl_med.layers.task_routing import TaskRouting, TaskSampler, routing_masks, split_by_task
from mtl_med.networks.resnet import ResNet

TINY = dict(widths=(4, 8), layers=(1, 1), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


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


def test_masked_stem_channels_get_zero_gradient_in_resnet_with_prelu():
    torch.manual_seed(0)
    net = ResNet(2, 1, ["a", "b"], sharing="routing", sigma=0.0, act="prelu", seed=3, **TINY)
    out = net(torch.randn(3, 1, 8, 8), task=1)["b"]
    out.sum().backward()
    masked = ~net.trl1.masks[1]
    assert masked.any()
    assert torch.all(net.conv1.weight.grad[masked] == 0)
    assert (net.conv1.weight.grad[~masked].flatten(1).abs().sum(1) > 0).all()


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


def test_masks_saved_and_restored_and_differ_between_seeds(tmp_path):
    a = ResNet(2, 1, [f"t{k}" for k in range(6)], sharing="routing", sigma=0.3, seed=0, **TINY)
    b = ResNet(2, 1, [f"t{k}" for k in range(6)], sharing="routing", sigma=0.3, seed=1, **TINY)
    again = ResNet(2, 1, [f"t{k}" for k in range(6)], sharing="routing", sigma=0.3, seed=0, **TINY)
    masks = {k: v for k, v in a.state_dict().items() if k.endswith("masks")}
    assert len(masks) == 1 + 2 + 2 + 1  # stem, two blocks with two convs, one downsample
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in masks.items())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in masks.items())
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b.load_state_dict(torch.load(tmp_path / "a.pt"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in masks.items())
    # masks are buffers, never trained
    assert all(not n.endswith("masks") for n, _ in a.named_parameters())


def test_sigma_one_equals_the_plain_network():
    torch.manual_seed(0)
    plain = ResNet(2, 1, ["a", "b", "c"], sharing="hard", **TINY).eval()
    routed = ResNet(2, 1, ["a", "b", "c"], sharing="routing", sigma=1.0, **TINY).eval()
    missing, unexpected = routed.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.endswith("masks") for k in missing)
    x = torch.randn(2, 1, 8, 8)
    ref = plain(x)
    for k, name in enumerate(["a", "b", "c"]):
        assert torch.equal(routed(x, task=k)[name], ref[name])
    assert all(torch.equal(routed(x)[n], ref[n]) for n in ref)


def test_switching_the_active_task_changes_outputs_only_through_the_masks():
    torch.manual_seed(0)
    net = ResNet(2, 1, ["a", "b"], sharing="routing", sigma=0.25, seed=5, **TINY).eval()
    x = torch.randn(2, 1, 8, 8)
    fa, fb = net.features(x, 0), net.features(x, 1)
    assert not torch.allclose(fa, fb)
    for m in net.modules():
        if isinstance(m, TaskRouting):
            m.masks[0] = m.masks[1]
    assert torch.equal(net.features(x, 0), fb)


def test_per_example_task_ids_match_one_task_per_batch():
    torch.manual_seed(0)
    net = ResNet(2, 1, ["a", "b", "c"], out_channels=[1, 2, 1], sharing="routing", sigma=0.5, **TINY).eval()
    x = torch.randn(5, 1, 8, 8)
    ids = torch.tensor([2, 0, 2, 1, 0])
    out = net(x, ids)
    assert set(out) == {"a", "b", "c"} and out["b"].shape == (1, 2)
    for k, name in enumerate(["a", "b", "c"]):
        sel = ids == k
        assert torch.allclose(out[name], net(x[sel], k)[name], atol=1e-6)
    targets = {"a": torch.arange(5), "b": torch.arange(5) * 10, "c": torch.arange(5) * 100}
    grouped = split_by_task(targets, ids, ["a", "b", "c"])
    assert grouped["c"].tolist() == [0, 200] and grouped["b"].tolist() == [30]


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


def test_scales_to_hundreds_of_tasks_without_backbone_copies():
    names = [f"attr_{k}" for k in range(312)]
    hard = ResNet(2, 1, names, sharing="hard", **TINY)
    routed = ResNet(2, 1, names, sharing="routing", sigma=0.4, **TINY)
    n_params = sum(p.numel() for p in routed.parameters())
    assert n_params == sum(p.numel() for p in hard.parameters())
    out = routed(torch.randn(3, 1, 8, 8), torch.tensor([0, 311, 150]))
    assert set(out) == {"attr_0", "attr_311", "attr_150"}
