"""Cross-stitch networks (Misra et al., CVPR 2016): one column per task, mixed at the branch points."""

from __future__ import annotations

from torch import nn

from .base import MultiTaskNetwork
from mtl_med.layers.cross_stitch import CrossStitch as CrossStitchUnit
from mtl_med.networks.blocks import Backbone, Trunk

__all__ = ["CrossStitch"]


class CrossStitch(MultiTaskNetwork):
    """``T`` columns with a cross-stitch unit after every branch point of the backbone (section 3:
    units after each pooling stage; here the backbone's stage ends), for any number of tasks.

    Args:
        stitch_self_weight: initial ``alpha_tt`` (section 5: ``(alpha_S, alpha_D) = (0.9, 0.1)``;
            the 0.1 is split over the other tasks).
        stitch_per_channel: one ``T x T`` matrix per channel instead of one per unit.
    """

    name = "cross_stitch"
    min_tasks = 2

    def __init__(self, backbone: Backbone, task_names, heads, stitch_self_weight: float = 0.9, stitch_per_channel: bool = False, bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        self.columns = nn.ModuleList(Trunk(backbone) for _ in self.task_names)
        self.stitches = nn.ModuleList(
            CrossStitchUnit(self.num_tasks, backbone.channels_after(b), self_weight=stitch_self_weight, per_channel=stitch_per_channel)
            for b in backbone.branch_points
        )

    def task_features(self, x, task, generator=None):
        ys = [x] * self.num_tasks  # every column is needed whatever task is asked for
        for (start, stop), stitch in zip(self.columns[0].segments(), self.stitches):
            ys = stitch([c.run(y, start, stop) for c, y in zip(self.columns, ys)])
        if task is None:
            return ys
        return ys[task] if isinstance(task, int) else self.rows_of(ys, task)
