"""What a backbone is made of: a layer factory, three kinds of unit, and the plain trunk they build.

A backbone (:class:`Backbone`) is an ordered list of units, each a small record:
:class:`ConvUnit` (convolution -> normalisation -> activation), :class:`Residual` (a residual
block) and :class:`PoolUnit`. Units are turned into modules by a :class:`LayerFactory`; a sharing
method that needs another normalisation (Task Routing after every batch-norm) or a wrapper around
residual blocks (AdaShare's gates) passes its own factory, and a method that changes what flows
between units (SFG's ``T + 1`` streams) reads the unit records and builds its own layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

__all__ = [
    "LayerFactory",
    "ConvUnit",
    "Residual",
    "PoolUnit",
    "Backbone",
    "ResidualBlock",
    "BasicBlock",
    "HighResBlock",
    "Trunk",
    "layer_spec",
    "check_spatial_dims",
    "scaled",
]


def layer_spec(spec: str | tuple | None) -> tuple[str, dict] | None:
    """A MONAI layer name or ``(name, args)`` as ``(name, args)``; ``None`` stays ``None``."""
    if spec is None:
        return None
    return (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))


class LayerFactory:
    """Makes the convolutions, normalisations and activations of one backbone.

    Args:
        spatial_dims: 2 or 3.
        norm: MONAI ``Norm`` name or ``(name, args)``; ``None`` for no normalisation.
        act: MONAI ``Act`` name or ``(name, args)``.
    """

    def __init__(self, spatial_dims: int, norm: str | tuple | None = "batch", act: str | tuple = "relu"):
        self.spatial_dims, self.norm_spec, self.act_spec = spatial_dims, layer_spec(norm), layer_spec(act)

    def conv(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, padding: int | None = None) -> nn.Module:
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        return Conv[Conv.CONV, self.spatial_dims](cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)

    def norm(self, channels: int) -> nn.Module:
        if self.norm_spec is None:
            return nn.Identity()
        name, args = self.norm_spec
        return Norm[name, self.spatial_dims](channels, **args)

    def act(self) -> nn.Module:
        name, args = self.act_spec
        return Act[name](**args)

    def block(self, block: nn.Module, index: int) -> nn.Module:
        """Hook around residual block ``index`` (of the backbone's residual blocks); plain: unchanged."""
        return block


@dataclass(frozen=True)
class ConvUnit:
    """``conv -> norm -> act``: the layers SFG turns into filter-group layers."""

    in_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    padding: int | None = None  # None: "same" for stride 1

    def build(self, f: LayerFactory) -> nn.Module:
        return nn.Sequential(
            f.conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.dilation, self.padding),
            f.norm(self.out_channels),
            f.act(),
        )


@dataclass(frozen=True)
class Residual:
    """A residual block: ``"basic"`` (ResNet's two 3x3 convolutions, post-activation) or
    ``"highres"`` (HighResNet's pre-activation block, width-preserving)."""

    kind: str
    in_channels: int
    out_channels: int
    stride: int = 1
    dilation: int = 1

    def build(self, f: LayerFactory) -> nn.Module:
        cls = {"basic": BasicBlock, "highres": HighResBlock}[self.kind]
        return cls(f, self.in_channels, self.out_channels, stride=self.stride, dilation=self.dilation)


@dataclass(frozen=True)
class PoolUnit:
    kind: str = "max"
    kernel_size: int = 2
    stride: int | None = None
    padding: int = 0
    ceil_mode: bool = False

    def build(self, f: LayerFactory) -> nn.Module:
        return Pool[self.kind, f.spatial_dims](self.kernel_size, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode)

    @property
    def out_channels(self) -> None:
        return None


@dataclass(frozen=True)
class Backbone:
    """A backbone as data: its units in order and the points where tasks may branch.

    Attributes:
        name: registry name, e.g. ``"resnet18"``.
        spatial_dims, in_channels: input.
        units: the units in order.
        branch_points: indices ``i`` such that tasks may separate after unit ``i`` (the stage
            ends: where cross-stitch units sit and Branched MTN may split); the last unit is one.
        norm, act: the layers the factory builds.
        dense: the output keeps the input's resolution (dense heads by default); otherwise heads
            pool globally.
        head_hidden: default width of the pooled heads' hidden layer (0: linear heads).
    """

    name: str
    spatial_dims: int
    in_channels: int
    units: tuple
    branch_points: tuple[int, ...]
    norm: str | tuple | None = "batch"
    act: str | tuple = "relu"
    dense: bool = False
    head_hidden: int = 0

    @property
    def out_channels(self) -> int:
        return next(u.out_channels for u in reversed(self.units) if not isinstance(u, PoolUnit))

    def channels_after(self, index: int) -> int:
        """Channels of the feature map after unit ``index``."""
        return next(u.out_channels for u in reversed(self.units[: index + 1]) if not isinstance(u, PoolUnit))

    @property
    def residual_indices(self) -> list[int]:
        return [i for i, u in enumerate(self.units) if isinstance(u, Residual)]

    def factory(self) -> LayerFactory:
        return LayerFactory(self.spatial_dims, self.norm, self.act)


class ResidualBlock(nn.Module):
    """``combine(residual(x), shortcut(x))``; AdaShare skips a block by returning ``shortcut(x)``."""

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def combine(self, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s + r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.residual(x), self.shortcut(x))


class BasicBlock(ResidualBlock):
    """ResNet's basic block (He et al. 2016): ``act(shortcut(x) + bn(conv(act(bn(conv(x))))))``,
    the shortcut a 1x1 convolution + norm where the shape changes."""

    def __init__(self, f: LayerFactory, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = f.conv(in_channels, out_channels, 3, stride=stride)
        self.bn1 = f.norm(out_channels)
        self.act1 = f.act()
        self.conv2 = f.conv(out_channels, out_channels, 3)
        self.bn2 = f.norm(out_channels)
        self.act2 = f.act()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(f.conv(in_channels, out_channels, 1, stride=stride, padding=0), f.norm(out_channels))

    def shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def residual(self, x):
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))

    def combine(self, r, s):
        return self.act2(s + r)


class HighResBlock(ResidualBlock):
    """HighResNet's residual block (Li et al. 2017; MONAI's ``HighResBlock`` with the same layers):
    ``x + conv(act(norm(conv(act(norm(x))))))``, dilated 3x3 convolutions, width preserved.

    Written with the factory so that a sharing method can swap its normalisation; given the same
    weights it computes exactly what MONAI's block computes (tested)."""

    def __init__(self, f: LayerFactory, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        if in_channels != out_channels or stride != 1:
            raise ValueError(f"a HighResNet block keeps its width and resolution, got {in_channels} -> {out_channels}, stride {stride}")
        self.norm1, self.act1 = f.norm(in_channels), f.act()
        self.conv1 = f.conv(in_channels, out_channels, 3, dilation=dilation)
        self.norm2, self.act2 = f.norm(out_channels), f.act()
        self.conv2 = f.conv(out_channels, out_channels, 3, dilation=dilation)

    def residual(self, x):
        return self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))

    def combine(self, r, s):
        return r + s  # MONAI's order of the sum


class Trunk(nn.Module):
    """The backbone's units ``start .. stop - 1`` (default: all) built by ``factory`` (default: the
    backbone's plain factory).

    ``forward(x)`` runs every unit; ``run(x, start, stop)`` runs units ``start .. stop - 1`` of this
    trunk, so a method can stop at the branch points (:meth:`segments`).
    """

    def __init__(self, backbone: Backbone, factory: LayerFactory | None = None, start: int = 0, stop: int | None = None):
        super().__init__()
        f = backbone.factory() if factory is None else factory
        units, n_res = [], sum(isinstance(u, Residual) for u in backbone.units[:start])
        for u in backbone.units[start:stop]:
            m = u.build(f)
            if isinstance(u, Residual):
                m, n_res = f.block(m, n_res), n_res + 1
            units.append(m)
        self.units = nn.ModuleList(units)
        self.branch_points = tuple(b - start for b in backbone.branch_points if start <= b < (len(backbone.units) if stop is None else stop))

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for m in self.units[start:stop]:
            x = m(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def segments(self) -> list[tuple[int, int]]:
        """``(start, stop)`` unit ranges ending at each branch point."""
        ends = [b + 1 for b in self.branch_points]
        return list(zip([0, *ends[:-1]], ends))


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(spatial_dims)


def scaled(widths: Sequence[int], width: float) -> list[int]:
    """Published widths times ``width`` (at least one channel each)."""
    if not float(width) > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return [max(1, round(w * float(width))) for w in widths]
