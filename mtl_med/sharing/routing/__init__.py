"""Task Routing (Strezoski et al., ICCV 2019): everything only about it.

- :mod:`.layer`: the fixed random per-task channel masks (:func:`routing_masks`, the :class:`TaskRoutingLayer`);
- :mod:`.network`: :class:`TaskRouting`, the sharing method (``build_network(..., "routing")``).

Drawing one task per mini-batch (algorithm 1) is generic: :class:`mtl_med.layers.TaskSampler`.
"""

from .layer import CONVENTIONS, routing_masks
from .layer import TaskRouting as TaskRoutingLayer
from .network import RoutedNorm, TaskRouting

__all__ = ["TaskRouting", "TaskRoutingLayer", "RoutedNorm", "routing_masks", "CONVENTIONS"]
