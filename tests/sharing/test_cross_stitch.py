"""Cross-stitch networks: one column per task, mixed by a cross-stitch unit at every branch point."""

import pytest
import torch

from mtl_med.layers.cross_stitch import CrossStitch as CrossStitchUnit
from mtl_med.networks import describe_backbone
from mtl_med.build import build_network
from mtl_med.sharing import CrossStitch

TASKS = ["a", "b", "c"]
RESNET = dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


def _cs(self_weight=0.9, tasks=TASKS, dims=2, **kw):
    torch.manual_seed(0)
    return build_network("resnet18", "cross_stitch", list(tasks), 2, spatial_dims=dims, in_channels=1,
                         stitch_self_weight=self_weight, **RESNET, **kw)


@pytest.mark.parametrize("dims", [2, 3])
def test_one_column_per_task_and_a_unit_per_branch_point(dims):
    net = _cs(dims=dims)
    assert isinstance(net, CrossStitch) and len(net.columns) == len(TASKS)
    # ResNet-18: after the stem and after each of the 4 stages
    assert len([m for m in net.modules() if isinstance(m, CrossStitchUnit)]) == 5 == len(describe_backbone("resnet18").branch_points)
    x = torch.randn(3, 1, *([6] * dims))
    out = net.eval()(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (3, 2) for t in TASKS}
    ids = torch.tensor([2, 0, 2])
    per = net(x, ids)
    assert list(per) == ["a", "c"]
    torch.testing.assert_close(per["c"], out["c"][[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per["a"], out["a"][[1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(x, "b")["b"], out["b"], rtol=1e-5, atol=1e-6)
    assert float(net.regularizer()) == 0.0


def test_every_column_runs_whatever_task_is_asked_for():
    net = _cs().eval()
    calls = []
    for k, column in enumerate(net.columns):
        column.units[0].register_forward_hook(lambda *a, k=k: calls.append(k))
    net(torch.randn(2, 1, 6, 6), "a")
    assert calls == [0, 1, 2]


def test_cross_stitch_units_decide_what_flows_between_columns():
    x = torch.randn(2, 1, 6, 6)
    for self_weight, flows in ((1.0, False), (0.9, True)):
        net = _cs(self_weight)
        net(x)["a"].sum().backward()
        other = net.columns[1].units[0][0].weight.grad  # the stem of task b's column
        assert (other is not None and other.abs().sum() > 0) == flows
        assert all(s.alpha.grad is not None for s in net.stitches)
        own = net.columns[0].units[0][0].weight.grad
        assert own is not None and own.abs().sum() > 0


def test_initial_units_keep_self_weight_and_split_the_rest():
    net = _cs(0.7, tasks=["x", "y", "z"], stitch_per_channel=True)
    spec = describe_backbone("resnet18", **RESNET)
    for stitch, b in zip(net.stitches, spec.branch_points):
        assert stitch.alpha.shape == (3, 3, spec.channels_after(b))
        torch.testing.assert_close(stitch.alpha[..., 0], torch.full((3, 3), 0.15).fill_diagonal_(0.7))


def test_cross_stitch_for_two_and_many_tasks():
    for tasks in (["x", "y"], [f"t{k}" for k in range(6)]):
        net = _cs(tasks=tasks)
        assert len(net.columns) == len(tasks) and net.stitches[0].alpha.shape == (len(tasks), len(tasks))
        out = net(torch.randn(2, 1, 6, 6))
        assert list(out) == tasks


def test_one_task_is_refused():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        _cs(tasks=["only"])


def test_units_sit_at_the_branch_points_of_any_backbone():
    torch.manual_seed(0)
    net = build_network("vgg11_bn", "cross_stitch", ["a", "b"], 1, in_channels=1, width=1 / 16)
    assert len(net.stitches) == len(describe_backbone("vgg11_bn").branch_points) == 5  # 4 poolings + the last convolution
    assert list(net(torch.randn(2, 1, 8, 8))) == ["a", "b"]


def test_units_after_every_convolution_as_the_sfg_papers_baseline():
    # SFG paper A.4 / appendix B: CS units on the outputs of the layers SFG groups; VGG-11: all eight convolutions
    vgg = dict(in_channels=1, width=1 / 16)
    plain = build_network("vgg11_bn", "cross_stitch", ["x", "y"], 2, **vgg)
    every = build_network("vgg11_bn", "cross_stitch", ["x", "y"], 2, stitch_at="convolutions", **vgg)
    spec = describe_backbone("vgg11_bn", **vgg)
    assert len(plain.stitches) == len(spec.branch_points) == 5
    assert len(every.stitches) == 8 == sum(type(u).__name__ == "ConvUnit" for u in spec.units)
    out = every.eval()(torch.randn(2, 1, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"x": (2, 2), "y": (2, 2)}
    # HighResNet's branch points are its five plain convolutions: both placements are the same network
    hr = dict(in_channels=1, features=(4, 8, 8))
    a = build_network("highresnet", "cross_stitch", ["x", "y"], 1, **hr)
    b = build_network("highresnet", "cross_stitch", ["x", "y"], 1, stitch_at="convolutions", **hr)
    assert len(a.stitches) == len(b.stitches) == 5 and a._segments == b._segments
    with pytest.raises(ValueError, match="stitch_at"):
        build_network("highresnet", "cross_stitch", ["x", "y"], 1, stitch_at="pools", **hr)


@pytest.mark.parametrize("stitch_at", ["branch_points", "convolutions"])
def test_identity_units_make_independent_columns_single_task(stitch_at):
    torch.manual_seed(0)
    kw = dict(in_channels=1, width=1 / 16)
    cs = build_network("vgg11_bn", "cross_stitch", ["x", "y"], 2, stitch_at=stitch_at, **kw).eval()
    single = build_network("vgg11_bn", "single_task", ["x", "y"], 2, **kw).eval()
    missing, unexpected = single.load_state_dict(cs.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("stitches.") for k in unexpected)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for s in cs.stitches:
            s.alpha.copy_(torch.eye(2))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cs(x).values(), single(x).values()))
    with torch.no_grad():
        cs.stitches[1].alpha.copy_(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert not torch.allclose(cs(x)["x"], single(x)["x"])
