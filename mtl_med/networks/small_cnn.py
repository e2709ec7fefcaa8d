"""The small CNN of the Selective Sharing paper's MNIST experiments (Strezoski et al., appendix A.1)."""

from __future__ import annotations

from .blocks import Backbone, ConvUnit, PoolUnit, check_spatial_dims, scaled

__all__ = ["mnist_cnn"]


def mnist_cnn(spatial_dims: int = 2, in_channels: int = 1, width: float = 1.0, act: str | tuple = "relu") -> Backbone:
    """Two 5x5 convolutions of 20 and 40 channels (unpadded), each with batch-norm, the activation
    and 2x max pooling: a 28x28 digit becomes 40 x 4 x 4 = 640 features (the paper's shared FC
    640 sits on them). Branch points: after each pooling."""
    check_spatial_dims(spatial_dims)
    c1, c2 = scaled((20, 40), width)
    units = (ConvUnit(in_channels, c1, 5, padding=0), PoolUnit("max", 2), ConvUnit(c1, c2, 5, padding=0), PoolUnit("max", 2))
    return Backbone("mnist_cnn", spatial_dims, in_channels, units, (1, 3), norm="batch", act=act)
