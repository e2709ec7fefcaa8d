"""build_network: one entry point for every (backbone, sharing) pair, and the cross-stitch ResNet."""

import pytest
import torch

from mtl_med.layers.cross_stitch import CrossStitch
from mtl_med.networks import AdaShareHighResNet, ResNet, SFGHighResNet, SFGVGG, TaskRoutingVGG, build_network
from mtl_med.networks.factory import SUPPORTED

TASKS = ["a", "b", "c"]
SMALL = {"vgg11": 0.1875, "vgg16": 0.1875, "resnet18": 0.0625, "resnet34": 0.0625, "highresnet": 0.375}
EXPECTED = {"routing": {"vgg": TaskRoutingVGG, "res": ResNet}, "adashare": {"res": ResNet, "hig": AdaShareHighResNet}}


@pytest.mark.parametrize("backbone,sharing", [(b, s) for b, ss in SUPPORTED.items() for s in ss])
def test_every_supported_pair_builds_and_returns_one_output_per_task(backbone, sharing):
    net = build_network(backbone, sharing, TASKS, {"a": 1, "b": 2, "c": 2}, in_channels=1, width=SMALL[backbone])
    cls = EXPECTED.get(sharing, {}).get(backbone[:3]) or {"vgg": SFGVGG, "res": ResNet, "hig": SFGHighResNet}[backbone[:3]]
    assert type(net) is cls
    if backbone.startswith("vgg") and sharing != "routing":
        assert net.sharing == sharing
    size = 16 if backbone != "highresnet" else 8
    out = net.eval()(torch.rand(2, 1, size, size))
    assert list(out) == TASKS
    assert out["a"].shape[:2] == (2, 1) and out["c"].shape[:2] == (2, 2)
    assert torch.as_tensor(net.regularizer()).ndim == 0


@pytest.mark.parametrize(
    "backbone,sharing,words",
    [
        ("vgg11", "adashare", ["adashare", "vgg11"]),
        ("resnet18", "sfg", ["sfg", "resnet18"]),
        ("highresnet", "routing", ["routing", "highresnet"]),
        ("alexnet", "sfg", ["alexnet"]),
        ("vgg11", "soft", ["soft"]),
    ],
)
def test_unsupported_values_raise_a_clear_error(backbone, sharing, words):
    with pytest.raises(ValueError) as e:
        build_network(backbone, sharing, TASKS, 2)
    assert all(w in str(e.value) for w in words)


def test_routing_sigma_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="sigma"):
        build_network("vgg11", "routing", TASKS, 2, width=0.1, sigma=1.5)


def _cs(self_weight=0.9, tasks=TASKS, dims=2):
    torch.manual_seed(0)
    return ResNet(dims, 1, tasks, 2, layers=(1, 1), widths=(4, 8), sharing="cross_stitch",
                  conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, stitch_self_weight=self_weight)


@pytest.mark.parametrize("dims", [2, 3])
def test_cross_stitch_resnet_has_one_column_per_task_and_a_unit_per_stage(dims):
    net = _cs(dims=dims)
    assert len(net.columns) == len(TASKS) - 1
    assert len([m for m in net.modules() if isinstance(m, CrossStitch)]) == 3  # stem + 2 stages
    x = torch.randn(3, 1, *([6] * dims))
    out = net.eval()(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (3, 2) for t in TASKS}
    ids = torch.tensor([2, 0, 2])
    per = net(x, ids)
    assert torch.allclose(per["c"], out["c"][[0, 2]], atol=1e-6) and torch.allclose(per["a"], out["a"][[1]], atol=1e-6)
    assert torch.allclose(net(x, "b")["b"], out["b"], atol=1e-6)


def test_cross_stitch_units_decide_what_flows_between_columns():
    x = torch.randn(2, 1, 6, 6)
    for self_weight, flows in ((1.0, False), (0.9, True)):
        net = _cs(self_weight)
        net(x)["a"].sum().backward()
        other = net.columns[0]["conv1"].weight.grad  # column of task b
        assert (other is not None and other.abs().sum() > 0) == flows
        assert net.stitches[0].alpha.grad is not None


def test_cross_stitch_for_two_and_many_tasks():
    for tasks in (["x", "y"], [f"t{k}" for k in range(6)]):
        out = _cs(tasks=tasks)(torch.randn(2, 1, 6, 6))
        assert list(out) == tasks
