"""VGG-11 / VGG-16 as data: convolutions, poolings, batch-norm, branch points."""

import pytest
import torch

from mtl_med.networks import BACKBONES, Trunk, describe_backbone
from mtl_med.networks.blocks import ConvUnit, PoolUnit
from mtl_med.networks.vgg import VGG_CFGS, vgg

WIDTHS = {11: [64, 128, 256, 256, 512, 512, 512, 512], 16: [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]}


@pytest.mark.parametrize("depth,convs", [(11, 8), (16, 13)])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_convolutions_poolings_and_branch_points(depth, convs, batch_norm):
    spec = describe_backbone(f"vgg{depth}" + ("_bn" if batch_norm else ""))
    conv = [u for u in spec.units if isinstance(u, ConvUnit)]
    pools = [i for i, u in enumerate(spec.units) if isinstance(u, PoolUnit)]
    assert len(conv) == convs == sum(v != "M" for v in VGG_CFGS[depth])
    assert [u.out_channels for u in conv] == WIDTHS[depth] and [u.in_channels for u in conv] == [3, *WIDTHS[depth][:-1]]
    assert all(u.kernel_size == 3 and u.stride == 1 for u in conv)
    # the last pooling is left to the heads' global average pooling; the others keep odd sizes (ceil)
    assert len(pools) == 4 and isinstance(spec.units[-1], ConvUnit)
    assert all(spec.units[i] == PoolUnit("max", 2, ceil_mode=True) for i in pools)
    assert spec.branch_points == (*pools, len(spec.units) - 1)
    assert spec.norm == ("batch" if batch_norm else None) and spec.head_hidden == 512 and spec.out_channels == 512
    assert spec.name == f"vgg{depth}" + ("_bn" if batch_norm else "") and not spec.dense


@pytest.mark.parametrize("batch_norm", [True, False])
def test_batch_norm_flag_builds_batch_norm_or_none(batch_norm):
    trunk = Trunk(vgg(11, batch_norm, width=1 / 16))
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == (8 if batch_norm else 0)
    assert all(m.bias is None for m in trunk.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("dims,size,out", [(2, 32, 2), (2, 8, 1), (3, 8, 1)])
def test_output_resolution(dims, size, out):
    trunk = Trunk(vgg(11, spatial_dims=dims, in_channels=1, width=1 / 16))
    assert trunk(torch.randn(2, 1, *([size] * dims))).shape == (2, 32, *([out] * dims))  # 4 poolings, ceil mode


def test_width_and_registry():
    assert [u.out_channels for u in vgg(16, width=1 / 16).units if isinstance(u, ConvUnit)][::3] == [4, 8, 16, 32, 32]
    assert BACKBONES["vgg16_bn"](width=0.5).units == vgg(16, True, width=0.5).units
    with pytest.raises(ValueError, match="depth"):
        vgg(19)
    with pytest.raises(ValueError, match="spatial_dims"):
        vgg(11, spatial_dims=1)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_parameter_count_of_the_published_vgg16(batch_norm):
    # torchvision's vgg16 features: 14,714,688 parameters, 4,224 of them convolution biases
    # (here bias-free convolutions, as they are followed by a normalisation or not); batch-norm adds 2 x 4,224
    trunk = Trunk(vgg(16, batch_norm))
    count = sum(p.numel() for p in trunk.parameters())
    assert count == 14_714_688 - 4_224 + (2 * 4_224 if batch_norm else 0)
