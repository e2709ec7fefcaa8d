"""SFG-HighResNet (section 4.1 and appendix B of the SFG paper), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.highresnet import HighResBlock
from torch import nn

from ..layers.sfg import SFGConv, _channel_mask
from .sfg import SFGNetwork

__all__ = ["SFGHighResNet"]


class SFGHighResNet(SFGNetwork):
    """HighResNet with stochastic filter groups at layers 1, 6, 11, 16 and 17 (appendix B).

    A 3x3 convolution, three sets of two residual blocks with dilations 1, 2, 4 and a 3x3
    convolution between sets, two final 3x3 convolutions and one linear 1x1 head per task. Every
    one of those five non-residual convolutions is an SFG layer; each filter group ``G_1..G_T, G_s``
    has its own residual tower (MONAI's ``HighResBlock``: batch-norm and PReLU as pre-activation,
    appendix B). A task head sees ``F_t + F_s`` of the last layer (Fig. 5).

    The towers are applied to the sparse stream of their group and their output is masked back to
    that group's channels. The original code left the towers unmasked; masking keeps the streams
    sparse at non-overlapping channels, as section 3.1 describes, and makes an empty group (the
    shared one of the single-task baseline, the task ones of hard sharing) contribute exactly zero.

    Heads are plain 1x1 convolutions with bias: MONAI's ``HighResNet`` ends with batch-norm, ReLU
    and dropout, which cannot output the negative values a regression head needs.

    Args:
        spatial_dims: 2 (slice-wise, as the paper) or 3.
        in_channels: input channels (1 MR volume).
        out_channels: channels of each task head, e.g. ``(1, 6)``: synthetic CT, 6-class labels.
        task_names: names of the outputs, e.g. ``("sct", "seg")``.
        features: widths of the three stages (16, 32, 64); the last two layers use the last width.
        dilations: dilation of each stage's residual blocks (1, 2, 4).
        blocks_per_stage: residual blocks per stage (2).
        sharing: ``"sfg"`` or a baseline (see :func:`~mtl_med.layers.sfg.grouping_init`).
        shared_init: initial shared probability of learned layers (A.1: 0.6).
        hard, noise, per_example: see :class:`~mtl_med.layers.sfg.StochasticFilterGroups`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: Sequence[int] = (1, 6),
        task_names: Sequence[str] = ("sct", "seg"),
        features: Sequence[int] = (16, 32, 64),
        dilations: Sequence[int] = (1, 2, 4),
        blocks_per_stage: int = 2,
        sharing: str = "sfg",
        shared_init: float = 0.6,
        hard: bool = True,
        noise: str = "log_p",
        per_example: bool = False,
        lambda1: float = 1e-6,
        lambda2: float = 1e-5,
        bn_inference: str = "population",
        act: str | tuple = "prelu",
    ):
        super().__init__(task_names, sharing, lambda1, lambda2, bn_inference)
        if len(out_channels) != self.num_tasks:
            raise ValueError(f"{len(task_names)} task names but {len(out_channels)} head widths")
        if len(features) != len(dilations):
            raise ValueError("features and dilations need one entry per stage")
        self.spatial_dims = spatial_dims
        T, groups = self.num_tasks, self.num_tasks + 1
        sfg = dict(num_tasks=T, mode=sharing, shared_init=shared_init, hard=hard, noise=noise, per_example=per_example, act=act)

        self.sfg = nn.ModuleList([SFGConv(spatial_dims, in_channels, features[0], first=True, **sfg)])
        self.towers = nn.ModuleList()
        norm = ("batch", {"affine": True})
        acti = (act, {}) if isinstance(act, str) else act
        for s, (width, dilation) in enumerate(zip(features, dilations)):
            self.towers.append(
                nn.ModuleList(
                    nn.Sequential(
                        *(
                            HighResBlock(spatial_dims, width, width, dilation=dilation, norm_type=norm, acti_type=acti)
                            for _ in range(blocks_per_stage)
                        )
                    )
                    for _ in range(groups)
                )
            )
            nxt = features[s + 1] if s + 1 < len(features) else features[-1]
            self.sfg.append(SFGConv(spatial_dims, width, nxt, merge="concat", **sfg))
        self.sfg.append(SFGConv(spatial_dims, features[-1], features[-1], merge="sum", **sfg))
        conv = Conv[Conv.CONV, spatial_dims]
        self.heads = nn.ModuleList(conv(features[-1], c, 1, bias=True) for c in out_channels)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        with self.batch_statistics(enabled=not self.training and self.bn_inference == "batch"):
            feats, z = self.sfg[0](x, generator, return_mask=True)
            for s, towers in enumerate(self.towers):
                feats = [_channel_mask(z, g, self.spatial_dims) * tower(f) for g, (tower, f) in enumerate(zip(towers, feats))]
                feats, z = self.sfg[s + 1](feats, generator, return_mask=True)
            feats = self.sfg[-1](feats, generator)
        shared = feats[self.num_tasks]
        return {name: head(feats[t] + shared) for t, (name, head) in enumerate(zip(self.task_names, self.heads))}
