"""HighResNet (Li et al., IPMI 2017) as the SFG paper uses it (appendix B), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

from .blocks import Backbone, ConvUnit, Residual, check_spatial_dims, scaled

__all__ = ["highresnet"]


def highresnet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    features: Sequence[int] | None = None,
    width: float = 1.0,
    dilations: Sequence[int] = (1, 2, 4),
    blocks_per_stage: int = 2,
    act: str | tuple = "prelu",
    norm: str | tuple | None = ("batch", {"affine": True}),
) -> Backbone:
    """A 3x3 convolution, three stages of ``blocks_per_stage`` residual blocks with dilations 1, 2, 4,
    each stage followed by a 3x3 convolution, and a last 3x3 convolution (SFG paper, appendix B:
    the five convolutions are its SFG layers 1, 6, 11, 16 and 17). Full resolution throughout.

    Args:
        features: widths of the three stages (default 16, 32, 64 times ``width``); the last two
            convolutions use the last width.
        dilations: dilation of each stage's blocks.
        blocks_per_stage: residual blocks per stage.
        act, norm: MONAI layer names (PReLU and batch-norm, as the paper).

    Branch points: after each of the five convolutions.
    """
    check_spatial_dims(spatial_dims)
    features = list(features) if features else scaled((16, 32, 64), width)
    if len(features) != len(dilations) or int(blocks_per_stage) < 1:
        raise ValueError(f"features {features} and dilations {list(dilations)} need one entry per stage, and blocks_per_stage >= 1")
    units, points = [ConvUnit(in_channels, features[0])], [0]
    for s, (w, d) in enumerate(zip(features, dilations)):
        units += [Residual("highres", w, w, dilation=d) for _ in range(int(blocks_per_stage))]
        units.append(ConvUnit(w, features[s + 1] if s + 1 < len(features) else features[-1]))
        points.append(len(units) - 1)
    units.append(ConvUnit(features[-1], features[-1]))
    points.append(len(units) - 1)
    return Backbone("highresnet", spatial_dims, in_channels, tuple(units), tuple(points), norm=norm, act=act, dense=True)
