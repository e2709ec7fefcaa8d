"""ResNet-18 and ResNet-34 (He et al., CVPR 2016), 2D or 3D."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from .blocks import Backbone, ConvUnit, PoolUnit, Residual, check_spatial_dims, scaled

__all__ = ["resnet", "resnet18", "resnet34", "RESNET_LAYERS"]

#: residual blocks per stage
RESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def resnet(
    depth: int = 18,
    spatial_dims: int = 2,
    in_channels: int = 3,
    widths: Sequence[int] | None = None,
    width: float = 1.0,
    act: str | tuple = "relu",
    norm: str | tuple | None = "batch",
    conv1_t_size: int = 7,
    conv1_t_stride: int = 2,
    no_max_pool: bool = False,
    layers: Sequence[int] | None = None,
) -> Backbone:
    """A stem (``conv1_t_size`` convolution, stride ``conv1_t_stride``, max-pool unless
    ``no_max_pool``) and four stages of basic blocks (widths 64..512 times ``width``), stride 2 at
    the start of stages 2-4. For small images (8x8 digits, 32x32 CIFAR) use a 3x3 stride-1 stem, as
    MONAI's ``ResNet`` allows. ResNet-18 has 8 and ResNet-34 16 residual blocks (AdaShare's NYU v2
    and other backbones); ``layers`` (blocks per stage) and ``widths`` of another length give a
    shorter or longer ResNet of the same blocks (tiny networks for tests).

    Branch points: after the stem and after each stage.
    """
    check_spatial_dims(spatial_dims)
    if int(depth) not in RESNET_LAYERS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
    layers = list(layers) if layers else list(RESNET_LAYERS[int(depth)])
    widths = list(widths) if widths else scaled((64, 128, 256, 512), width)[: len(layers)]
    if len(widths) != len(layers):
        raise ValueError(f"widths {widths} and layers {layers} need one entry per stage")
    units = [ConvUnit(in_channels, widths[0], conv1_t_size, stride=conv1_t_stride, padding=conv1_t_size // 2)]
    if not no_max_pool:
        units.append(PoolUnit("max", 3, stride=2, padding=1))
    points, c = [len(units) - 1], widths[0]
    for stage, (n, w) in enumerate(zip(layers, widths)):
        for i in range(n):
            units.append(Residual("basic", c, w, stride=2 if stage > 0 and i == 0 else 1))
            c = w
        points.append(len(units) - 1)
    return Backbone(f"resnet{int(depth)}", spatial_dims, in_channels, tuple(units), tuple(points), norm=norm, act=act)


def resnet18(**kwargs) -> Backbone:
    """ResNet-18: :func:`resnet` with 8 residual blocks."""
    return resnet(18, **kwargs)


def resnet34(**kwargs) -> Backbone:
    """ResNet-34: :func:`resnet` with 16 residual blocks."""
    return resnet(34, **kwargs)


# build_network checks a call's arguments against the backbone's signature: show resnet's, less depth
_signature = inspect.signature(resnet)
resnet18.__signature__ = resnet34.__signature__ = _signature.replace(
    parameters=[p for n, p in _signature.parameters.items() if n != "depth"]
)
