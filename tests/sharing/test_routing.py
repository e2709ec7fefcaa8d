"""Task Routing: a fixed random channel mask per task after every normalisation, one pass per task."""

import pytest
import torch

from mtl_med.sharing.routing.layer import TaskRouting as TaskRoutingLayer
from mtl_med.build import build_network
from mtl_med.networks.blocks import BasicBlock
from mtl_med.sharing import HardSharing, TaskRouting
from mtl_med.sharing.routing import RoutedNorm

TASKS = ["a", "b", "c"]
SMALL = {
    "resnet18": dict(widths=(4, 4, 8, 8), conv1_t_size=3, conv1_t_stride=1, no_max_pool=True),
    "vgg11_bn": dict(width=1 / 16),
    "vgg16_bn": dict(width=1 / 16),
    "vgg11": dict(width=1 / 16),
}


def _net(backbone="resnet18", sharing="routing", tasks=TASKS, out=1, dims=2, **kw):
    torch.manual_seed(0)
    return build_network(backbone, sharing, list(tasks), out, spatial_dims=dims, in_channels=1, **{**SMALL[backbone], **kw})


def _routed_convs(net):
    """``(convolution, RoutedNorm)`` pairs: every routed normalisation with the convolution it follows."""
    pairs = []
    for m in net.trunk.modules():
        if isinstance(m, torch.nn.Sequential) and len(m) >= 2 and isinstance(m[1], RoutedNorm):
            pairs.append((m[0], m[1]))  # a ConvUnit, or a ResNet block's downsampling path
        elif isinstance(m, BasicBlock):
            pairs += [(m.conv1, m.bn1), (m.conv2, m.bn2)]
    return pairs


def _hard_twin(routed):
    """A hard-sharing network with ``routed``'s weights (its routed normalisations unwrapped)."""
    args = {k: v for k, v in routed.build_args.items() if k not in ("sigma", "seed")}
    hard = build_network(**{**args, "sharing": "hard_sharing"})
    state = {k.replace(".norm.", "."): v for k, v in routed.state_dict().items() if not k.endswith("route.masks")}
    hard.load_state_dict(state)  # strict: the same layers, only the masks added
    return hard


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11_bn"])
@pytest.mark.parametrize("dims", [2, 3])
def test_output_dict_and_task_selection(backbone, dims):
    net = _net(backbone, tasks=["age", "gender"], out={"age": 1, "gender": 2}, dims=dims)
    assert isinstance(net, TaskRouting) and net.task_names == ["age", "gender"]
    x = torch.randn(2, 1, *([8] * dims))
    out = net(x)
    assert list(out) == ["age", "gender"] and out["age"].shape == (2, 1) and out["gender"].shape == (2, 2)
    assert list(net(x, "gender")) == ["gender"] and list(net(x, 0)) == ["age"]
    reg = net.regularizer()
    assert reg.ndim == 0 and float(reg) == 0.0


@pytest.mark.parametrize("backbone,expected", [("resnet18", 1 + 2 * 8 + 3), ("vgg11_bn", 8), ("vgg16_bn", 13), ("vgg11", 8)])
def test_a_routing_layer_after_every_normalisation(backbone, expected):
    # ResNet-18: the stem, both normalisations of its 8 blocks and the 3 downsampling paths;
    # VGG: every convolution (after the batch-norm, or after the convolution without one)
    net = _net(backbone)
    routers = net.routing_layers()
    assert len(routers) == expected == len(_routed_convs(net))
    norms = [m for m in _net(backbone, "hard_sharing").modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == (expected if backbone != "vgg11" else 0)
    assert all(r.masks.shape == (len(TASKS), r.num_units) and r.sigma == 0.5 for r in routers)


@pytest.mark.parametrize(
    "backbone,dims,act", [("resnet18", 2, "relu"), ("vgg11_bn", 2, "prelu"), ("vgg11_bn", 3, "prelu"), ("vgg11", 2, "relu")]
)
def test_masked_units_get_exactly_zero_gradient(backbone, dims, act):
    net = _net(backbone, dims=dims, sigma=0.0, act=act).train()
    x = torch.randn(2, 1, *([8] * dims))
    out = net(x, 1)["b"]
    (out * torch.randn_like(out)).sum().backward()
    masked_somewhere = False
    for conv, routed in _routed_convs(net):
        masked = ~routed.route.masks[1]
        masked_somewhere |= bool(masked.any())
        assert torch.all(conv.weight.grad[masked] == 0)
        if isinstance(routed.norm, torch.nn.modules.batchnorm._BatchNorm):
            assert torch.all(routed.norm.weight.grad[masked] == 0) and torch.all(routed.norm.bias.grad[masked] == 0)
    first_conv, first = _routed_convs(net)[0]
    assert masked_somewhere and first_conv.weight.grad[first.route.masks[1]].abs().sum() > 0
    assert float(net.regularizer()) == 0.0


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11_bn"])
def test_sigma_one_is_hard_sharing(backbone):
    net = _net(backbone, sigma=1.0)
    assert all(bool(r.masks.all()) for r in net.routing_layers())
    hard = _hard_twin(net)
    assert isinstance(hard, HardSharing)
    x = torch.randn(3, 1, 8, 8)
    for mode in ("eval", "train"):  # population and batch statistics
        getattr(net, mode)(), getattr(hard, mode)()
        routed, plain = net(x), hard(x)
        assert all(torch.equal(routed[n], plain[n]) for n in TASKS)


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11_bn"])
def test_sigma_below_one_gives_each_task_its_own_subnetwork(backbone):
    net = _net(backbone, sigma=0.0).train()  # batch statistics: no unit of a fresh network is dead
    x = torch.randn(4, 1, 16, 16)
    plain = _hard_twin(net).train()(x)
    out = net(x)
    assert not torch.allclose(out["a"], plain["a"])
    # the tasks differ only by their masks: the same head on task b's route gives another output
    assert not torch.allclose(net.heads(net.task_features(x, 0), 0), net.heads(net.task_features(x, 1), 0))


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11_bn"])
def test_per_example_task_ids_equal_per_task_passes(backbone):
    net = _net(backbone).eval()
    x = torch.randn(5, 1, 8, 8)
    ids = torch.tensor([2, 0, 2, 1, 0])
    per = net(x, ids)
    assert list(per) == ["a", "b", "c"]
    feats = net.task_features(x, ids)
    for k, name in enumerate(TASKS):
        rows = (ids == k).nonzero(as_tuple=True)[0]
        torch.testing.assert_close(feats[rows], net.task_features(x, k)[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(per[name], net(x, k)[name][rows], rtol=1e-5, atol=1e-6)
    only = net(x, torch.tensor([1, 1, 1, 1, 1]))
    assert list(only) == ["b"] and only["b"].shape == (5, 1)


def test_masks_are_seeded_and_saved():
    a, b, c = _net(seed=3), _net(seed=3), _net(seed=4)
    masks = lambda n: torch.cat([r.masks.flatten() for r in n.routing_layers()])  # noqa: E731
    assert torch.equal(masks(a), masks(b)) and not torch.equal(masks(a), masks(c))
    c.load_state_dict(a.state_dict())
    assert torch.equal(masks(c), masks(a))
    assert all(isinstance(r, TaskRoutingLayer) for r in a.routing_layers())


def test_sigma_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="sigma"):
        _net("vgg11_bn", sigma=1.5)


def test_switching_the_active_task_changes_features_only_through_the_masks():
    net = _net(sigma=0.25, seed=5).eval()
    x = torch.randn(2, 1, 8, 8)
    fa, fb = net.task_features(x, 0), net.task_features(x, 1)
    assert not torch.allclose(fa, fb)
    for layer in net.routing_layers():
        layer.masks[0] = layer.masks[1]
    assert torch.equal(net.task_features(x, 0), fb)


def test_hundreds_of_tasks_cost_no_backbone_copies():
    names = [f"attr_{k}" for k in range(312)]
    hard, routed = _net(sharing="hard_sharing", tasks=names, out=2), _net(tasks=names, out=2, sigma=0.4)
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in hard.parameters())
    out = routed(torch.randn(3, 1, 8, 8), torch.tensor([0, 311, 150]))
    assert set(out) == {"attr_0", "attr_311", "attr_150"} and all(v.shape == (1, 2) for v in out.values())
