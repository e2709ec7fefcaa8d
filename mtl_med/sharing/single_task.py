"""Single-task columns: one backbone per task, nothing shared (the no-sharing reference)."""

from __future__ import annotations

from torch import nn

from .base import MultiTaskNetwork
from mtl_med.networks.blocks import Backbone, Trunk

__all__ = ["SingleTask"]


class SingleTask(MultiTaskNetwork):
    """``T`` independent trunks (``columns[k]`` for task ``k``), each with its own head: the same
    as ``T`` single-task networks trained on a summed loss. Only the asked task's column runs."""

    name = "single_task"
    may_skip_parameters = True

    def __init__(self, backbone: Backbone, task_names, heads, bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        self.columns = nn.ModuleList(Trunk(backbone) for _ in self.task_names)

    def plain_trunks(self):
        return list(self.columns)

    def task_features(self, x, task, generator=None):
        if task is None:
            return [c(x) for c in self.columns]
        if isinstance(task, int):
            return self.columns[task](x)
        return self.per_example(x, task, lambda rows, k: self.columns[k](rows))
