"""Hard parameter sharing (Caruana 1993): one trunk for every task, one head per task."""

from __future__ import annotations

from .base import MultiTaskNetwork
from mtl_med.networks.blocks import Backbone, Trunk

__all__ = ["HardSharing"]


class HardSharing(MultiTaskNetwork):
    """Every task uses the whole backbone; the trunk runs once per forward pass for all tasks."""

    name = "hard_sharing"

    def __init__(self, backbone: Backbone, task_names, heads, bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        self.trunk = Trunk(backbone)

    def plain_trunks(self):
        return [self.trunk]

    def task_features(self, x, task, generator=None):
        y = self.trunk(x)
        return [y] * self.num_tasks if task is None else y
