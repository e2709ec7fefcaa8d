"""ResNet-18 / ResNet-34 as data: blocks, widths, strides, branch points; the same network as MONAI's."""

import pytest
import torch
from monai.networks.nets import ResNet as MonaiResNet
from monai.networks.nets import resnet18 as monai_resnet18

from mtl_med.networks import Trunk, describe_backbone
from mtl_med.networks.blocks import ConvUnit, PoolUnit, Residual
from mtl_med.networks.resnet import RESNET_LAYERS, resnet, resnet18, resnet34

SMALL_STEM = dict(conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


def _blocks(spec):
    return [u for u in spec.units if isinstance(u, Residual)]


@pytest.mark.parametrize("depth,per_stage", [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3))])
def test_block_counts_widths_and_strides(depth, per_stage):
    spec = describe_backbone(f"resnet{depth}")
    blocks = _blocks(spec)
    assert RESNET_LAYERS[depth] == per_stage and len(blocks) == sum(per_stage) == {18: 8, 34: 16}[depth]
    assert len(spec.residual_indices) == len(blocks) and all(b.kind == "basic" for b in blocks)
    widths = [w for w, n in zip((64, 128, 256, 512), per_stage) for _ in range(n)]
    assert [b.out_channels for b in blocks] == widths and spec.out_channels == 512
    assert [b.in_channels for b in blocks] == [64, *widths[:-1]]
    firsts = {sum(per_stage[:s]) for s in range(1, 4)}  # the first block of stages 2-4 halves the resolution
    assert [b.stride for b in blocks] == [2 if i in firsts else 1 for i in range(len(blocks))]
    assert spec.name == f"resnet{depth}" and not spec.dense and spec.head_hidden == 0 and spec.norm == "batch"


def test_stem_and_branch_points():
    spec = resnet18()
    stem, pool = spec.units[:2]
    assert stem == ConvUnit(3, 64, 7, stride=2, padding=3) and pool == PoolUnit("max", 3, stride=2, padding=1)
    # after the stem (its pooling) and after each stage
    assert spec.branch_points == (1, 3, 5, 7, 9) and [spec.channels_after(b) for b in spec.branch_points] == [64, 64, 128, 256, 512]
    small = resnet18(in_channels=1, width=0.0625, **SMALL_STEM)
    assert small.units[0] == ConvUnit(1, 4, 3, stride=1, padding=1) and not any(isinstance(u, PoolUnit) for u in small.units)
    assert small.branch_points == (0, 2, 4, 6, 8) and [small.channels_after(b) for b in small.branch_points] == [4, 4, 8, 16, 32]
    assert resnet34().branch_points == (1, 4, 8, 14, 17)


def test_widths_and_bad_arguments():
    assert [b.out_channels for b in _blocks(resnet18(width=0.0625))][::2] == [4, 8, 16, 32]
    assert [b.out_channels for b in _blocks(resnet34(widths=(2, 3, 5, 7)))][-1] == 7
    assert resnet18(width=0.001).out_channels == 1  # at least one channel
    with pytest.raises(ValueError, match="widths"):
        resnet18(widths=(4, 8))
    with pytest.raises(ValueError, match="depth"):
        resnet(50)
    with pytest.raises(ValueError, match="spatial_dims"):
        resnet18(spatial_dims=1)
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)


@pytest.mark.parametrize("dims,size,stem", [(2, 32, {}), (3, 16, {}), (2, 8, SMALL_STEM)])
def test_output_resolution(dims, size, stem):
    trunk = Trunk(resnet18(spatial_dims=dims, in_channels=2, width=0.0625, **stem))
    y = trunk(torch.randn(2, 2, *([size] * dims)))
    # the default stem divides by 4, each of stages 2-4 by 2
    expected = max(1, size // (32 if not stem else 8))
    assert y.shape == (2, 32, *([expected] * dims))


#: MONAI's ResNet with the layers of the published one: a stride-2 stem, bias-free downsampling convolutions
PUBLISHED = dict(conv1_t_stride=2, feed_forward=False, bias_downsample=False)


def _monai(dims, widths, stem):
    kw = {**PUBLISHED, **stem}
    return MonaiResNet("basic", [2, 2, 2, 2], list(widths), spatial_dims=dims, n_input_channels=2, **kw)


@pytest.mark.parametrize("dims,stem", [(2, {}), (3, {}), (2, SMALL_STEM)])
def test_the_trunk_computes_what_monai_resnet18_computes(dims, stem):
    torch.manual_seed(0)
    trunk = Trunk(resnet18(spatial_dims=dims, in_channels=2, widths=(4, 6, 8, 10), **stem)).eval()
    ref = _monai(dims, (4, 6, 8, 10), stem).eval()
    ours, theirs = trunk.state_dict(), ref.state_dict()
    # the same layers in the same order: conv1, bn1, then per block conv1, bn1, conv2, bn2, downsampling
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    with torch.no_grad():
        for name, v in zip(theirs, ours.values()):
            theirs[name] = v + 0.01 * torch.randn_like(v) if v.is_floating_point() and "running_var" not in name else v
    ref.load_state_dict(theirs)
    trunk.load_state_dict(dict(zip(ours, theirs.values())))
    x = torch.randn(2, 2, *([16] * dims))
    with torch.no_grad():
        torch.testing.assert_close(torch.flatten(trunk(x).mean(tuple(range(2, 2 + dims))), 1), ref(x), rtol=1e-5, atol=1e-6)


def test_parameter_count_of_the_published_resnet18():
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in the 1000-class fc layer
    trunk = Trunk(resnet18())
    count = sum(p.numel() for p in trunk.parameters())
    assert count == 11_689_512 - 513_000 == 11_176_512
    monai = monai_resnet18(spatial_dims=2, n_input_channels=3, **PUBLISHED)
    assert count == sum(p.numel() for p in monai.parameters())
