"""The training side of Selective Sharing (Strezoski et al., fig. 3): gradient capture every iteration,
clustering and branch merging at every epoch end, until the architecture is locked.

:class:`SelectiveSharingHandler` attaches to a multi-task trainer such as :class:`mtl_med.engines.MultiTaskTrainer` (the
network's :meth:`~mtl_med.sharing.selective.SelectiveSharing.train_handlers` makes it):

- ``IterationEvents.BACKWARD_COMPLETED`` (after ``backward``, before ``optimizer.step``): the first-FC
  weight gradient of each active branch, as TT factors (section 3.1-3.2). One backward of the total
  loss suffices: branch ``b``'s weights only receive the gradient of the tasks routed to ``b``.
  Steps with a non-finite gradient (AMP overflow, skipped by the scaler too) are left out; AMP's
  loss scale cancels in the normalisation.
- ``ITERATION_COMPLETED``: each task's loss from ``engine.state.output["terms"]``.
- ``EPOCH_COMPLETED``: cluster the branches (HDBSCAN, the network's sharing condition), merge each
  group into its branch of lowest loss, apply the stop rule, log and write the record.

Under DDP the gradients read on a rank are already averaged over the ranks; the bundles attach this
handler on rank 0 only, and DDP broadcasts rank 0's buffers (``branch_of_task`` and ``locked``
among them) at every forward pass, so every rank trains with rank 0's merges from the next
iteration on. Checkpoints are rank 0's; after the last epoch the other ranks' in-memory map lacks
that epoch's merges, as no forward pass follows (two gloo processes: equal weights, rank 1's map
of the epoch before).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from mtl_med.io import atomic_write_json
from mtl_med.networks.utils import unwrap as _net

from .clustering import CONDITIONS, StopRule, cluster_branches, merge_groups, mutual_reachability, pairwise_distances
from .network import SelectiveSharing
from .ttsvd import FactorAccumulator

__all__ = ["SelectiveSharingHandler", "membership_image", "clusters_image"]

log = logging.getLogger(__name__)


def _rgb(fig) -> np.ndarray:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="raw", dpi=fig.dpi)
    w, h = fig.canvas.get_width_height()
    plt.close(fig)
    return np.frombuffer(buf.getvalue(), np.uint8).reshape(h, w, 4)[..., :3].copy()


def membership_image(epochs, branch_of_task, task_names, lock_epoch: int | None = None) -> np.ndarray:
    """Group membership over epochs (fig. 1's branches joining): one row per epoch, one column per
    task, coloured and labelled by the branch the task uses after that epoch. RGB ``uint8`` ``(H, W, 3)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(branch_of_task, dtype=float).reshape(len(epochs), len(task_names))
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(task_names), 1.0 + 0.3 * len(epochs)), dpi=80)
    ax.imshow(grid, cmap="tab20", vmin=0, vmax=19, aspect="auto", interpolation="nearest")
    if grid.size <= 400:
        for (i, j), b in np.ndenumerate(grid):
            ax.text(j, i, int(b), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(task_names)), task_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(epochs)), [str(e) + (" (locked)" if lock_epoch is not None and e >= lock_epoch else "") for e in epochs], fontsize=7)
    ax.set_ylabel("epoch", fontsize=8)
    ax.set_title("branch of each task", fontsize=9)
    fig.tight_layout()
    return _rgb(fig)


def clusters_image(distances, labels, branch_names, min_samples: int = 2, title: str = "") -> np.ndarray:
    """The cluster picture of one epoch: the single-linkage dendrogram of the branches under HDBSCAN's
    mutual reachability distance (eq. 6, the tree HDBSCAN condenses), leaves labelled by the tasks of
    each branch and coloured by the group found (grey: alone). RGB ``uint8`` ``(H, W, 3)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    fig, ax = plt.subplots(figsize=(2.0 + 0.5 * len(branch_names), 3.2), dpi=80)
    if len(branch_names) >= 2:
        mr = mutual_reachability(np.asarray(distances), min_samples)
        tree = linkage(squareform(mr, checks=False), method="single")
        dendrogram(tree, labels=list(branch_names), ax=ax, color_threshold=0, above_threshold_color="black", leaf_rotation=90)
        colours = plt.get_cmap("tab10")
        order = {name: i for i, name in enumerate(branch_names)}
        for tick in ax.get_xticklabels():
            g = int(labels[order[tick.get_text()]])
            tick.set_color("grey" if g < 0 else colours(g % 10))
            tick.set_fontsize(7)
        ax.set_ylabel("mutual reachability", fontsize=8)
    else:
        ax.text(0.5, 0.5, "one branch", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _rgb(fig)


class SelectiveSharingHandler:
    """Gradient capture, clustering, merging, stop rule and records of Selective Sharing.

    Args:
        network: the :class:`~mtl_med.sharing.selective.SelectiveSharing` network (or a DDP wrapper).
        condition, tt_rank, start_epoch, patience, min_cluster_size, min_samples,
            allow_single_cluster, seed: default to the network's settings.
        summary_writer: TensorBoard writer: scalars ``selective/active_branches``,
            ``selective/active_parameters``, ``selective/groups``, ``selective/locked`` and images
            ``selective/membership`` (tasks' branches over epochs) and ``selective/clusters``
            (the dendrogram of the branches clustered that epoch).
        record_file: JSON written atomically after every epoch: the settings and one record per
            epoch (groups, distances, labels, survivors, losses, active parameters, locked).
        images: whether to log the images.

    The stop rule's counter and the records are this handler's state (:meth:`state_dict`, for a
    checkpoint's ``save_dict``); the groups and the lock are the network's buffers, so a model
    checkpoint alone resumes with the same branches and does not cluster again once locked.
    """

    def __init__(self, network, summary_writer=None, record_file: str | os.PathLike | None = None, images: bool = True, **settings):
        net = _net(network)
        if not isinstance(net, SelectiveSharing):
            raise ValueError(f"SelectiveSharingHandler needs a 'selective' network, got {type(net).__name__}")
        unknown = set(settings) - set(net.settings)
        if unknown:
            raise ValueError(f"unknown Selective Sharing settings {sorted(unknown)}; expected {sorted(net.settings)}")
        self.network, self.writer, self.images = network, summary_writer, images
        self.record_file = None if record_file is None else os.fspath(record_file)
        self.settings = {**net.settings, **settings}
        if self.settings["condition"] not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.settings['condition']!r}")
        self.stop = StopRule(self.settings["patience"])
        self.factors = FactorAccumulator(self.settings["tt_rank"])
        self.records: list[dict] = []
        self.lock_epoch: int | None = None
        self.skipped = 0
        self._resumed_from = 0
        self._reset_losses()

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stop": self.stop.state_dict(), "records": json.dumps(self.records), "lock_epoch": -1 if self.lock_epoch is None else self.lock_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.stop.load_state_dict(state["stop"])
        self.records = json.loads(state["records"])
        lock = int(state["lock_epoch"])
        self.lock_epoch = None if lock < 0 else lock

    # --- events --------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.capture)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate_losses)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _reset_losses(self) -> None:
        self.loss_sums: dict[str, float] = {}
        self.loss_counts: dict[str, int] = {}

    def started(self, engine: Engine) -> None:
        self._resumed_from = int(engine.state.epoch)
        if self._resumed_from and not self.records and self.record_file and os.path.isfile(self.record_file):
            # resumed without this handler's state: keep the records of the epochs already run
            with open(self.record_file) as f:
                old = json.load(f).get("epochs", [])
            self.records = [r for r in old if int(r["epoch"]) <= self._resumed_from]
            locks = [int(r["epoch"]) for r in self.records if r.get("locked")]
            self.lock_epoch = min(locks) if locks else None

    def epoch_started(self, engine: Engine) -> None:
        self.factors.reset()
        self._reset_losses()
        self.skipped = 0

    def _active(self, engine: Engine) -> bool:
        return not _net(self.network).is_locked and engine.state.epoch >= self.settings["start_epoch"]

    def capture(self, engine: Engine) -> None:
        if not self._active(engine):
            return
        branches, grads = _net(self.network).branch_weight_grads()
        if grads is None:
            return
        if not bool(torch.isfinite(grads).all()):
            self.skipped += 1
            return
        self.factors.add(branches, grads)

    def accumulate_losses(self, engine: Engine) -> None:
        terms = (engine.state.output or {}).get("terms", {})
        for name in _net(self.network).task_names:
            if name in terms:
                v = float(terms[name])
                if math.isfinite(v):
                    self.loss_sums[name] = self.loss_sums.get(name, 0.0) + v
                    self.loss_counts[name] = self.loss_counts.get(name, 0) + 1

    def task_losses(self) -> dict[str, float]:
        """Each task's mean loss over the epoch so far."""
        return {t: self.loss_sums[t] / self.loss_counts[t] for t in self.loss_sums}

    def branch_losses(self) -> dict[int, float]:
        """Each active branch's aggregated loss: the mean of its tasks' epoch losses, so that a
        branch already serving several tasks is not penalised by a sum (section 3.4 says
        "aggregated loss" only)."""
        net, task = _net(self.network), self.task_losses()
        out = {}
        for b in net.active_branches():
            values = [task[n] for n, a in zip(net.task_names, net.assignment()) if a == b and n in task]
            out[b] = float(np.mean(values)) if values else math.inf
        return out

    def epoch_completed(self, engine: Engine) -> None:
        net, epoch, s = _net(self.network), int(engine.state.epoch), self.settings
        record = {"epoch": epoch, "clustered": False, "condition": s["condition"], "batches": len(self.factors), "skipped_batches": self.skipped}
        before = net.assignment()
        losses = self.branch_losses()
        if self._active(engine):
            branches, points = self.factors.points()
            labels = np.full(len(branches), -1, dtype=int)
            distances = np.zeros((len(branches), len(branches)))
            merges = []
            if len(branches) >= 2 and len(self.factors):
                distances = pairwise_distances(points)
                labels = cluster_branches(points, s["condition"], seed=s["seed"] + epoch, min_cluster_size=s["min_cluster_size"],
                                          min_samples=s["min_samples"], allow_single_cluster=s["allow_single_cluster"])
                after, merges = merge_groups(before, branches, labels, losses)
                net.set_assignment(after)
                record["clustered"] = True
            for m in merges:
                m["tasks"] = [n for n, b in zip(net.task_names, before) if b in m["members"]]
                m["losses"] = {str(b): losses.get(b) for b in m["members"]}
            # one branch left (every task shares it) also ends grouping; an epoch that could not
            # cluster counts as unchanged
            if self.stop.update(bool(merges), net.assignment()):
                net.lock()
                self.lock_epoch = epoch
            record.update(branches=branches, labels=[int(v) for v in labels], distances=np.round(distances, 6).tolist(),
                          merges=merges, survivors=[m["survivor"] for m in merges])
            if record["clustered"] and self.writer is not None and self.images:
                names = ["+".join(n for n, b in zip(net.task_names, before) if b == br) for br in branches]
                title = f"epoch {epoch}, {s['condition']}"
                self.writer.add_image("selective/clusters", clusters_image(distances, labels, names, s["min_samples"], title), epoch, dataformats="HWC")
        record.update(
            task_losses=self.task_losses(),
            branch_losses={str(b): v for b, v in losses.items()},
            branch_of_task=dict(zip(net.task_names, net.assignment())),
            groups=net.groups(),
            active_branches=len(net.active_branches()),
            active_parameters=net.active_parameter_count(),
            total_parameters=sum(p.numel() for p in net.parameters()),
            unchanged_epochs=self.stop.unchanged,
            locked=net.is_locked,
            lock_epoch=self.lock_epoch,
        )
        self.records = [r for r in self.records if int(r["epoch"]) < epoch] + [_finite(record)]
        self._log(epoch, record)
        if self.record_file:
            atomic_write_json({"method": "selective", "task_names": net.task_names, "settings": s, "epochs": self.records}, self.record_file)

    def _log(self, epoch: int, record: dict) -> None:
        net = _net(self.network)
        log.info("epoch %d selective sharing: groups %s, %d active parameters%s", epoch, record["groups"], record["active_parameters"],
                 ", locked" if record["locked"] else "")
        if self.writer is None:
            return
        self.writer.add_scalar("selective/active_branches", record["active_branches"], epoch)
        self.writer.add_scalar("selective/active_parameters", record["active_parameters"], epoch)
        self.writer.add_scalar("selective/groups", sum(len(g) > 1 for g in record["groups"]), epoch)
        self.writer.add_scalar("selective/locked", float(record["locked"]), epoch)
        if self.images:
            epochs = [r["epoch"] for r in self.records]
            grid = [[r["branch_of_task"][t] for t in net.task_names] for r in self.records]
            self.writer.add_image("selective/membership", membership_image(epochs, grid, net.task_names, self.lock_epoch), epoch, dataformats="HWC")


def _finite(obj):
    """JSON has no infinity: non-finite numbers become ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return _finite(float(obj))
    return obj
