"""Task Routing (Strezoski et al., ICCV 2019): a fixed random channel mask per task after every
normalisation of the backbone (section 3.2, fig. 3), one forward pass per task."""

from __future__ import annotations

import torch
from torch import nn

from mtl_med.networks.blocks import Backbone, LayerFactory, Trunk

from ..base import MultiTaskNetwork, TaskContext
from .layer import TaskRouting as TaskRoutingLayer

__all__ = ["TaskRouting", "RoutedNorm"]


class RoutedNorm(nn.Module):
    """``route(norm(x))`` with the mask of the context's current task."""

    def __init__(self, norm: nn.Module, route: TaskRoutingLayer, context: TaskContext):
        super().__init__()
        self.norm, self.route, self.context = norm, route, context

    def forward(self, x):
        return self.route(self.norm(x), self.context.task)


class _RoutingFactory(LayerFactory):
    def __init__(self, backbone: Backbone, num_tasks: int, sigma: float, generator: torch.Generator, context: TaskContext, convention: str):
        super().__init__(backbone.spatial_dims, backbone.norm, backbone.act)
        self.num_tasks, self.sigma, self.generator, self.context, self.convention = num_tasks, sigma, generator, context, convention

    def norm(self, channels):
        # after the batch-norm (section 3.2); after the convolution where there is none
        route = TaskRoutingLayer(channels, self.num_tasks, self.sigma, generator=self.generator, convention=self.convention)
        return RoutedNorm(super().norm(channels), route, self.context)


class TaskRouting(MultiTaskNetwork):
    """A Task Routing Layer after every normalisation of the backbone (including the shortcut's of
    ResNet blocks and the pre-activations of HighResNet blocks).

    Args:
        sigma: sharing ratio, the fraction of units shared by all tasks (paper convention: 1 is
            hard sharing, 0 one subnetwork per task; see :mod:`mtl_med.sharing.routing.layer`).
        seed: seed of the masks, drawn in construction order from one generator.
        convention: ``"paper"`` (sigma = the fraction shared by all tasks) or ``"knockout"``
            (the authors' code: sigma = the fraction each task zeroes, drawn per task).
    """

    name = "routing"

    def __init__(self, backbone: Backbone, task_names, heads, sigma: float = 0.5, seed: int = 0, convention: str = "paper",
                 bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        self.sigma, self.convention = float(sigma), convention
        g = torch.Generator().manual_seed(int(seed))
        self.trunk = Trunk(backbone, _RoutingFactory(backbone, self.num_tasks, self.sigma, g, self.context, convention))

    def routing_layers(self) -> list[TaskRoutingLayer]:
        return [m for m in self.modules() if isinstance(m, TaskRoutingLayer)]

    def _run(self, x, task):
        with self.in_context(task=task):
            return self.trunk(x)

    def task_features(self, x, task, generator=None):
        if task is None:
            return [self._run(x, k) for k in range(self.num_tasks)]
        return self._run(x, task)
