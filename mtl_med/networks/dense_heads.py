"""Dense prediction heads that return each task's map at the input's resolution, for backbones that
downsample (ResNet's stride 32, VGG's pooling, the MNIST CNN's unpadded convolutions).

``build_network(..., head="aspp" | "fcn")`` builds them and calls :meth:`UpsampledHeads.attach`, a forward
pre-hook on the network that records the spatial size of each input; every head's output is resized
(bilinear / trilinear) to that size, so an odd crop (AdaShare's 321 x 321) comes back at 321 x 321 even
where the strides do not divide it. Called outside a network, ``heads(x, k, size=...)`` takes the size.

* :class:`ASPPHeads`: DeepLab-v2's ASPP (Chen et al. 2017, ASPP-L), the head AdaShare puts on its
  Deeplab-ResNet for every task (section 4, "Implementation Details"; ``models/base.py`` of its code):
  four parallel branches at dilation rates 6, 12, 18, 24, each a dilated 3x3 convolution, a 1x1
  convolution (both with ReLU and dropout 0.5) and a 1x1 classifier, the branch outputs summed. The
  hidden width defaults to 256 ("light"; AdaShare uses DeepLab's 1024). MONAI's ``SimpleASPP`` is the
  DeepLab-v3 concatenation variant, not this one.
* :class:`FCNHeads`: the simple FCN head (torchvision's ``FCNHead``): 3x3 convolution to ``in / 4``
  channels, batch-norm, ReLU, dropout 0.1, 1x1 classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Dropout, Norm
from torch import nn

from .heads import _counts

__all__ = ["UpsampledHeads", "ASPPHeads", "FCNHeads", "DENSE_HEADS"]


class UpsampledHeads(nn.Module):
    """One head module per task (``self.task_heads[k]``), each output resized to the input's spatial size.

    The size is transient (not state): :meth:`attach` records it at each forward pass of the network."""

    def __init__(self, spatial_dims: int, out_channels: Sequence[int], heads: Sequence[nn.Module]):
        super().__init__()
        self.spatial_dims, self.out_channels = int(spatial_dims), _counts(out_channels)
        self.task_heads = nn.ModuleList(heads)
        self._size: tuple[int, ...] | None = None

    def attach(self, network: nn.Module) -> None:
        """Record the spatial size of ``network``'s input before each of its forward passes."""
        network.register_forward_pre_hook(self._record_size, with_kwargs=True)

    def _record_size(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor):
            self._size = tuple(int(s) for s in x.shape[2:])

    def rebuilt(self, in_channels: int) -> "UpsampledHeads":
        """New heads of the same kind and settings on ``in_channels`` features (freshly initialised): for a
        method that puts its own layers between the backbone and the heads (Selective Sharing's branches)."""
        return type(self)(self.spatial_dims, int(in_channels), self.out_channels, **getattr(self, "settings", {}))

    def forward(self, x: torch.Tensor, task: int, size: Sequence[int] | None = None) -> torch.Tensor:
        y = self.task_heads[task](x)
        size = tuple(size) if size is not None else self._size
        if size is not None and tuple(y.shape[2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear" if self.spatial_dims == 2 else "trilinear", align_corners=False)
        return y


class _ASPP(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, hidden: int, rates: Sequence[int], dropout: float):
        super().__init__()
        conv, drop = Conv[Conv.CONV, spatial_dims], Dropout[Dropout.DROPOUT, spatial_dims]
        self.branches = nn.ModuleList(
            nn.Sequential(
                conv(in_channels, hidden, 3, padding=r, dilation=r), nn.ReLU(inplace=True), drop(dropout),
                conv(hidden, hidden, 1), nn.ReLU(inplace=True), drop(dropout),
                conv(hidden, out_channels, 1),
            )
            for r in rates
        )

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


class ASPPHeads(UpsampledHeads):
    """Per task a DeepLab-v2 ASPP (see the module docstring), upsampled to the input size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: the backbone's output channels.
        out_channels: outputs of each task.
        hidden: width of each branch (AdaShare: 1024).
        rates: dilation rates of the branches (DeepLab-v2 ASPP-L: 6, 12, 18, 24).
        dropout: after each hidden layer (DeepLab-v2: 0.5).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: Sequence[int], hidden: int = 256,
                 rates: Sequence[int] = (6, 12, 18, 24), dropout: float = 0.5):
        counts = _counts(out_channels)
        if int(hidden) < 1 or not rates or min(int(r) for r in rates) < 1:
            raise ValueError(f"ASPP needs hidden >= 1 and positive rates, got hidden={hidden}, rates={rates}")
        super().__init__(spatial_dims, counts, [_ASPP(spatial_dims, in_channels, c, int(hidden), [int(r) for r in rates], float(dropout)) for c in counts])
        self.settings = dict(hidden=int(hidden), rates=[int(r) for r in rates], dropout=float(dropout))


class FCNHeads(UpsampledHeads):
    """Per task the simple FCN head (3x3 conv to ``hidden`` channels, norm, ReLU, dropout, 1x1 conv),
    upsampled to the input size; ``hidden`` defaults to ``in_channels // 4`` (torchvision's ``FCNHead``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: Sequence[int], hidden: int | None = None, dropout: float = 0.1):
        counts = _counts(out_channels)
        settings = dict(hidden=hidden, dropout=float(dropout))  # hidden None follows in_channels when rebuilt
        hidden = max(1, int(in_channels) // 4) if hidden is None else int(hidden)
        conv = Conv[Conv.CONV, spatial_dims]
        heads = [
            nn.Sequential(conv(in_channels, hidden, 3, padding=1, bias=False), Norm[Norm.BATCH, spatial_dims](hidden), nn.ReLU(inplace=True),
                          Dropout[Dropout.DROPOUT, spatial_dims](float(dropout)), conv(hidden, c, 1))
            for c in counts
        ]
        super().__init__(spatial_dims, counts, heads)
        self.settings = settings


#: ``build_network``'s ``head=`` names of the upsampling dense heads
DENSE_HEADS = {"aspp": ASPPHeads, "fcn": FCNHeads}
