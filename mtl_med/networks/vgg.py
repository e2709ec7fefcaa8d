"""VGG-11 and VGG-16 (Simonyan & Zisserman, configurations A and D), with or without batch-norm, 2D or 3D."""

from __future__ import annotations

from .blocks import Backbone, ConvUnit, PoolUnit, check_spatial_dims, scaled

__all__ = ["VGG_CFGS", "vgg"]

#: widths, "M" = 2x max pooling
VGG_CFGS: dict[int, tuple] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def vgg(
    depth: int = 11,
    batch_norm: bool = True,
    spatial_dims: int = 2,
    in_channels: int = 3,
    width: float = 1.0,
    act: str | tuple = "relu",
) -> Backbone:
    """The convolutions of VGG-``depth`` (widths times ``width``), each followed by batch-norm when
    ``batch_norm`` and the activation.

    The last max pooling is left out: the pooled heads' global average pooling takes its place
    (SFG paper, section 4.1: global average pooling and two fully connected layers per task). The
    other poolings use ``ceil_mode`` so small inputs (8x8 digits) keep a 1x1 map. The heads'
    hidden layer defaults to the last convolution's width (SFG's two FC layers per task; Task
    Routing's per-task embedding, section 3.3).

    Branch points: after each pooling and after the last convolution.
    """
    check_spatial_dims(spatial_dims)
    if int(depth) not in VGG_CFGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
    cfg = VGG_CFGS[int(depth)][:-1]
    units, points, c = [], [], in_channels
    for v in cfg:
        if v == "M":
            units.append(PoolUnit("max", 2, ceil_mode=True))
            points.append(len(units) - 1)
        else:
            w = scaled([v], width)[0]
            units.append(ConvUnit(c, w))
            c = w
    points.append(len(units) - 1)
    name = f"vgg{int(depth)}" + ("_bn" if batch_norm else "")
    return Backbone(name, spatial_dims, in_channels, tuple(units), tuple(points), norm="batch" if batch_norm else None, act=act, head_hidden=c)
