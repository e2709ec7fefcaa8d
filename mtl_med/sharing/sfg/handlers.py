"""SFG's training handlers: Gumbel-Softmax temperature annealing (A.1) and TensorBoard views of the
learned grouping (the SFG paper's figs. 6, 10 and 11)."""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from ignite.engine import Engine, Events

from mtl_med.networks.utils import unwrap as _net

__all__ = ["TemperatureHandler", "GroupingHandler", "simplex_image"]

log = logging.getLogger(__name__)


class TemperatureHandler:
    """Sets the Gumbel-Softmax temperature before every iteration from a schedule of the
    iteration count (e.g. :class:`~mtl_med.layers.ExponentialTemperature`, A.1).

    The temperature follows ``engine.state.iteration``, which MONAI's ``CheckpointLoader``
    restores with the trainer, so a resumed run continues the schedule where it stopped.

    Every DDP rank runs it (``every_rank``): each rank's replica must anneal alike.
    """

    #: every DDP rank attaches it (the bundles keep such handlers on ranks other than 0)
    every_rank = True

    def __init__(self, schedule, network: torch.nn.Module, summary_writer=None, log_every: int = 100):
        self.schedule, self.network, self.writer, self.log_every = schedule, network, summary_writer, log_every

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        it = engine.state.iteration - 1  # ITERATION_STARTED fires after the counter moved
        self.schedule.iteration = it
        tau = self.schedule(it)
        _net(self.network).set_temperature(tau)
        if self.writer is not None and it % self.log_every == 0:
            self.writer.add_scalar("sfg/temperature", tau, it)


def simplex_image(p: torch.Tensor, labels=("task 1", "task 2", "shared"), title: str = "") -> np.ndarray:
    """Kernels' grouping probabilities ``(K, 3)`` as points on the 2-simplex (figs. 10-11), an RGB
    ``uint8`` array ``(H, W, 3)`` for ``SummaryWriter.add_image(..., dataformats="HWC")``.

    With more than two tasks the task groups are summed pairwise into the first corner so the
    picture stays a triangle: corner 1 holds task 1, corner 2 the other tasks, corner 3 shared.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.as_tensor(p, dtype=torch.float32)
    if p.shape[-1] > 3:
        p = torch.stack([p[:, 0], p[:, 1:-1].sum(-1), p[:, -1]], -1)
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    # paper layout: task 1 bottom-left, task 2 bottom-right, shared at the top
    xy = p.numpy() @ corners
    fig, ax = plt.subplots(figsize=(3, 2.8), dpi=80)
    ax.fill(*corners.T, facecolor="none", edgecolor="black", lw=1)
    ax.scatter(xy[:, 0], xy[:, 1], s=14, alpha=0.5, c="tab:green", edgecolors="none")
    for (x, y), name, va in zip(corners, labels, ("top", "top", "bottom")):
        ax.annotate(name, (x, y), ha="center", va=va, fontsize=8, xytext=(0, -4 if va == "top" else 4), textcoords="offset points")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(-0.15, 1.0)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="raw", dpi=80)
    w, h = fig.canvas.get_width_height()
    plt.close(fig)
    return np.frombuffer(buf.getvalue(), np.uint8).reshape(h, w, 4)[..., :3].copy()


class GroupingHandler:
    """Logs, every ``interval`` iterations, each SFG layer's proportion of kernels per group
    (``sfg/<layer>/<group>``), its mean grouping entropy, and the kernels' probabilities drawn
    on the 2-simplex as an image (``sfg_simplex/<layer>``)."""

    def __init__(self, summary_writer, network: torch.nn.Module, interval: int = 100, images: bool = True):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.writer, self.network, self.interval, self.images = summary_writer, network, interval, images

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        net = _net(self.network)
        step = engine.state.iteration
        groups = [*net.task_names, "shared"]
        entropy = net.mean_entropy()
        for layer, props in net.group_proportions().items():
            for g, v in zip(groups, props):
                self.writer.add_scalar(f"sfg/{layer}/{g}", v, step)
            self.writer.add_scalar(f"sfg/{layer}/mean_entropy", entropy[layer], step)
        if self.images:
            labels = (net.task_names[0], "+".join(net.task_names[1:]), "shared")
            for layer, p in net.grouping_probabilities().items():
                self.writer.add_image(f"sfg_simplex/{layer}", simplex_image(p, labels, layer), step, dataformats="HWC")
        log.info("iteration %d grouping %s", step, {k: [round(x, 2) for x in v] for k, v in net.group_proportions().items()})
