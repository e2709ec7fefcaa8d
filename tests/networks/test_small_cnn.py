"""The Selective Sharing paper's MNIST CNN as data."""

import pytest
import torch

from mtl_med.networks import BACKBONES, Trunk, describe_backbone
from mtl_med.networks.blocks import ConvUnit, PoolUnit
from mtl_med.networks.small_cnn import mnist_cnn


def test_description():
    spec = describe_backbone("mnist_cnn")
    assert spec.units == (ConvUnit(1, 20, 5, padding=0), PoolUnit("max", 2), ConvUnit(20, 40, 5, padding=0), PoolUnit("max", 2))
    assert spec.branch_points == (1, 3) and spec.out_channels == 40 and spec.channels_after(1) == 20
    assert spec.norm == "batch" and spec.act == "relu" and not spec.dense and spec.residual_indices == []
    assert BACKBONES["mnist_cnn"] is mnist_cnn


def test_a_digit_becomes_640_features():
    trunk = Trunk(mnist_cnn())
    y = trunk(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 40, 4, 4) and y.flatten(1).shape[1] == 640
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules()) == 2
    # two 5x5 convolutions without bias, two batch-norms
    assert sum(p.numel() for p in trunk.parameters()) == 25 * 20 + 2 * 20 + 25 * 20 * 40 + 2 * 40


def test_width_channels_and_3d():
    spec = mnist_cnn(in_channels=3, width=0.5)
    assert [u.out_channels for u in spec.units if isinstance(u, ConvUnit)] == [10, 20] and spec.units[0].in_channels == 3
    y = Trunk(mnist_cnn(spatial_dims=3, width=0.1))(torch.randn(1, 1, 28, 28, 28))
    assert y.shape == (1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="spatial_dims"):
        mnist_cnn(spatial_dims=1)
