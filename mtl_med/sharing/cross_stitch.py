"""Cross-stitch networks (Misra et al., CVPR 2016): one column per task, mixed at the branch points or
after every convolution."""

from __future__ import annotations

from torch import nn

from .base import MultiTaskNetwork
from mtl_med.layers.cross_stitch import CrossStitch as CrossStitchUnit
from mtl_med.networks.blocks import Backbone, ConvUnit, Trunk

__all__ = ["CrossStitch", "STITCH_POSITIONS"]

#: where the units sit: the backbone's branch points (Misra et al., section 3: after each pooling
#: stage) or after every convolution unit (the SFG paper's CS baseline, A.4 and appendix B)
STITCH_POSITIONS = ("branch_points", "convolutions")


def stitch_points(backbone: Backbone, stitch_at: str = "branch_points") -> tuple[int, ...]:
    """Indices of the units after which a cross-stitch unit sits."""
    if stitch_at == "branch_points":
        return tuple(backbone.branch_points)
    if stitch_at == "convolutions":
        return tuple(i for i, u in enumerate(backbone.units) if isinstance(u, ConvUnit))
    raise ValueError(f"stitch_at must be one of {STITCH_POSITIONS}, got {stitch_at!r}")


class CrossStitch(MultiTaskNetwork):
    """``T`` columns with a cross-stitch unit after every branch point of the backbone (section 3:
    units after each pooling stage; here the backbone's stage ends), for any number of tasks.

    The SFG paper's cross-stitch baseline (appendix A.4) is "implemented in a similar fashion to the
    single-task networks, with CS modules applied to the output of the task-specific convolutional
    layers", on the layers where SFG sits (appendix B: "the CS units were added to the same set of
    layers"): ``stitch_at="convolutions"`` puts a unit after every convolution unit of the backbone
    (VGG-11: all eight; HighResNet: its five plain convolutions, which are already its branch points),
    and the bundles give each column ``1 / T`` of the backbone's width, as the paper's columns had
    50% of each layer's kernels for two tasks.

    Args:
        stitch_self_weight: initial ``alpha_tt`` (section 5: ``(alpha_S, alpha_D) = (0.9, 0.1)``;
            the 0.1 is split over the other tasks).
        stitch_per_channel: one ``T x T`` matrix per channel instead of one per unit.
        stitch_at: ``"branch_points"`` (Misra et al.) or ``"convolutions"`` (the SFG paper's CS
            baseline); see :data:`STITCH_POSITIONS`.
    """

    name = "cross_stitch"
    min_tasks = 2

    def __init__(self, backbone: Backbone, task_names, heads, stitch_self_weight: float = 0.9, stitch_per_channel: bool = False,
                 stitch_at: str = "branch_points", bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        points = stitch_points(backbone, stitch_at)
        self.stitch_at = stitch_at
        self.columns = nn.ModuleList(Trunk(backbone) for _ in self.task_names)
        self.stitches = nn.ModuleList(
            CrossStitchUnit(self.num_tasks, backbone.channels_after(b), self_weight=stitch_self_weight, per_channel=stitch_per_channel)
            for b in points
        )
        # unit ranges ending at each stitch; units after the last one (if any) run unstitched
        ends = [b + 1 for b in points]
        self._segments = list(zip([0, *ends[:-1]], ends))
        tail = ends[-1] if ends else 0
        self._tail = tail if tail < len(backbone.units) else None

    def task_features(self, x, task, generator=None):
        ys = [x] * self.num_tasks  # every column is needed whatever task is asked for
        for (start, stop), stitch in zip(self._segments, self.stitches):
            ys = stitch([c.run(y, start, stop) for c, y in zip(self.columns, ys)])
        if self._tail is not None:
            ys = [c.run(y, self._tail) for c, y in zip(self.columns, ys)]
        if task is None:
            return ys
        return ys[task] if isinstance(task, int) else self.rows_of(ys, task)
