"""Engine pieces for multi-task image classification / regression / ranking (the vision bundles): task
losses from task types, a validation score, the per-task report (CSV and summary JSON with
delta-m) and a predictions CSV."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from mtl_med.io import atomic_write_text
from mtl_med.metrics.multitask import binary_predictions, multitask_metrics, write_summary_json

__all__ = [
    "TASK_TYPES",
    "RegressionLoss",
    "PairwiseRankingLoss",
    "task_losses",
    "task_out_channels",
    "primary_metric",
    "PerTaskScore",
    "MultiTaskScore",
    "MultiTaskReport",
    "PredictionWriter",
    "load_baseline",
    "image_files",
    "match_channels",
]

log = logging.getLogger(__name__)

TASK_TYPES = ("binary", "regression", "ranking")
#: the measure of each task type that the score and delta-m use (higher accuracy and tau, lower MAE is better)
PRIMARY = {"binary": "accuracy", "regression": "mae", "ranking": "kendall_tau"}
_REGRESSION_LOSSES = {"l1": nn.L1Loss, "mse": nn.MSELoss, "smooth_l1": nn.SmoothL1Loss}


def _check_types(task_types: Mapping[str, str]) -> None:
    bad = {t: k for t, k in task_types.items() if k not in TASK_TYPES}
    if bad:
        raise ValueError(f"unknown task types {bad}; expected one of {TASK_TYPES}")


class RegressionLoss(nn.Module):
    """A regression loss between a ``(B, 1)`` output and ``(B,)`` targets (reshaped to match)."""

    def __init__(self, kind: str = "l1"):
        super().__init__()
        if kind not in _REGRESSION_LOSSES:
            raise ValueError(f"unknown regression loss {kind!r}; expected one of {sorted(_REGRESSION_LOSSES)}")
        self.loss = _REGRESSION_LOSSES[kind]()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(input.reshape(target.shape).float(), target.float())


class PairwiseRankingLoss(nn.Module):
    """Eq. 7 of Selective Sharing (after Chen et al.'s ranking CNNs): over the pairs of a batch whose
    targets are ordered, ``y_i > y_j``, the squared hinge ``max(0, 1 - (f(x_i) - f(x_j)))^2``,
    averaged. Tied pairs carry no order and are left out; a batch without an ordered pair gives 0
    (still connected to the graph, so every task's term exists)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f, y = input.reshape(-1).float(), target.reshape(-1).float()
        if f.shape != y.shape:
            raise ValueError(f"ranking scores {tuple(input.shape)} do not match targets {tuple(target.shape)}")
        ordered = y[:, None] > y[None, :]  # pair (i, j) with y_i > y_j
        if not ordered.any():
            return f.sum() * 0.0
        margin = f[:, None] - f[None, :]
        return torch.clamp(1.0 - margin[ordered], min=0.0).square().mean()


def task_losses(task_types: Mapping[str, str], regression: str = "l1") -> dict[str, nn.Module]:
    """Task name -> loss: cross-entropy over two logits for ``"binary"`` tasks, ``regression``
    (``"l1"``, ``"mse"``, ``"smooth_l1"``) for ``"regression"`` tasks, eq. 7's pairwise hinge for
    ``"ranking"`` tasks; for :class:`~mtl_med.losses.MultiTaskLoss`."""
    _check_types(task_types)
    make = {"binary": nn.CrossEntropyLoss, "regression": lambda: RegressionLoss(regression), "ranking": PairwiseRankingLoss}
    return {t: make[k]() for t, k in task_types.items()}


def task_out_channels(task_types: Mapping[str, str]) -> dict[str, int]:
    """Task name -> network outputs: 2 logits for a binary task, 1 value for a regression or ranking task."""
    _check_types(task_types)
    return {t: 2 if k == "binary" else 1 for t, k in task_types.items()}


def primary_metric(per_task: Mapping[str, Mapping[str, float]], task_types: Mapping[str, str]) -> float:
    """Mean over the binary tasks' accuracy and the ranking tasks' Kendall tau (both higher is
    better, at most 1); ``-`` mean MAE when there is neither."""
    acc = [m[PRIMARY[task_types[t]]] for t, m in per_task.items() if task_types.get(t) in ("binary", "ranking")]
    if acc:
        return float(np.mean(acc))
    return -float(np.mean([m["mae"] for m in per_task.values()]))


class _Collector:
    """Outputs and targets of every task over an epoch (``{task: tensor}`` dicts in ``output``)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.preds, self.labels = {}, {}

    def update(self, pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]):
        for t, p in pred.items():
            if t in label:
                self.preds.setdefault(t, []).append(p.detach().float().cpu())
                self.labels.setdefault(t, []).append(label[t].detach().cpu())

    def gathered(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        import ignite.distributed as idist

        preds = {t: torch.cat(v) for t, v in self.preds.items()}
        labels = {t: torch.cat(v) for t, v in self.labels.items()}
        if idist.get_world_size() > 1:  # every rank computes the metrics of the whole split
            preds = {t: idist.all_gather(v.to(idist.device())).cpu() for t, v in preds.items()}
            labels = {t: idist.all_gather(v.to(idist.device())).cpu() for t, v in labels.items()}
        return preds, labels


def _pred_label(output: Mapping) -> tuple:
    return output[Keys.PRED], output[Keys.LABEL]


class PerTaskScore(Metric):
    """A score whose ``compute()`` also fills ``results`` (``{task: {metric: value}}``); on completion the
    engine's metrics get the score under its name and every ``"<task>/<metric>"``."""

    results: dict

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = self.compute()
        for task, metrics in self.results.items():
            for m, v in metrics.items():
                engine.state.metrics[f"{task}/{m}"] = v


class MultiTaskScore(PerTaskScore):
    """Validation score for networks returning ``{task: output}``: the mean accuracy over binary
    tasks (``-`` mean MAE without binary tasks), a scalar for ``key_val_metric`` and checkpoint
    selection. On completion every task's metrics also go to ``engine.state.metrics`` as
    ``"<task>/<metric>"`` (TensorBoardStatsHandler logs them).

    Args:
        task_types: task name -> ``"binary"``, ``"regression"`` or ``"ranking"``.
        regression_scale: task name -> factor applied before the MAE (e.g. 100: UTKFace ages).
    """

    def __init__(self, task_types: Mapping[str, str], regression_scale: Mapping[str, float] | None = None, output_transform=None):
        _check_types(task_types)
        self.task_types, self.regression_scale = dict(task_types), dict(regression_scale or {})
        self._data = _Collector()
        self.results: dict[str, dict[str, float]] = {}
        super().__init__(output_transform=output_transform or _pred_label)

    def reset(self) -> None:
        self._data.reset()

    def update(self, output) -> None:
        self._data.update(*output)

    def compute(self) -> float:
        preds, labels = self._data.gathered()
        if not preds:
            raise RuntimeError("MultiTaskScore saw no outputs")
        self.results = multitask_metrics(preds, labels, self.task_types, self.regression_scale)
        return primary_metric(self.results, self.task_types)

def read_baseline_tasks(path: str | os.PathLike, missing: str, not_summary: str) -> dict:
    """The ``"tasks"`` mapping of a single-task run's summary JSON; ``FileNotFoundError`` (``missing``) or
    ``ValueError`` (``not_summary``), each naming ``path``, otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {missing}")
    with open(path) as f:
        tasks = json.load(f).get("tasks")
    if not isinstance(tasks, dict):
        raise ValueError(f"{path}: {not_summary}")
    return tasks


def load_baseline(path: str | os.PathLike, task_types: Mapping[str, str]) -> dict[str, float]:
    """``"task/metric" -> value`` of the single-task run whose summary JSON (written by
    :class:`MultiTaskReport`) is ``path``: accuracy of binary tasks, MAE of regression tasks."""
    tasks = read_baseline_tasks(path, "single-task baseline summary not found (run evaluate.json with the single_task variant first)",
                                "not a summary JSON (no 'tasks')")
    out = {}
    for t, kind in task_types.items():
        key = PRIMARY[kind]
        if t not in tasks or key not in tasks[t]:
            raise ValueError(f"{path}: no {key!r} for task {t!r}")
        out[f"{t}/{key}"] = float(tasks[t][key]["mean"])
    return out


class MultiTaskReport:
    """Evaluator handler: at the end of a run, every task's metrics in a CSV (one row per task:
    ``task, type, accuracy, precision, recall, mae, kendall_tau, n``) and a summary JSON
    (:func:`mtl_med.metrics.multitask.write_summary_json`: per-task values, the mean accuracy and,
    given a single-task baseline, delta-m of eq. 1 of Vandenhende et al.). Written on rank 0 only.

    Args:
        task_types: task name -> ``"binary"``, ``"regression"`` or ``"ranking"``.
        output_dir: folder of the two files.
        baseline_file: summary JSON of the single-task run (``None``: no delta-m).
        regression_scale: task name -> factor applied before the MAE.
        csv_name, json_name: file names.
        extra: more entries for the summary JSON (variant, checkpoint, ...).
    """

    COLUMNS = ("task", "type", "accuracy", "precision", "recall", "mae", "kendall_tau", "n")

    def __init__(
        self,
        task_types: Mapping[str, str],
        output_dir: str | os.PathLike,
        baseline_file: str | os.PathLike | None = None,
        regression_scale: Mapping[str, float] | None = None,
        csv_name: str = "metrics.csv",
        json_name: str = "summary.json",
        extra: Mapping | None = None,
    ):
        _check_types(task_types)
        self.task_types, self.output_dir = dict(task_types), os.fspath(output_dir)
        self.baseline = load_baseline(baseline_file, self.task_types) if baseline_file else None
        self.baseline_file = baseline_file
        self.regression_scale, self.csv_name, self.json_name = dict(regression_scale or {}), csv_name, json_name
        self.extra = dict(extra or {})
        self._data = _Collector()
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self._data.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self._data.update(e.state.output[Keys.PRED], e.state.output[Keys.LABEL]))
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import ignite.distributed as idist

        preds, labels = self._data.gathered()
        per_task = multitask_metrics(preds, labels, self.task_types, self.regression_scale)
        if idist.get_rank() != 0:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.COLUMNS)
        for t, m in per_task.items():
            w.writerow([t, self.task_types[t], *(repr(m[k]) if k in m else "" for k in self.COLUMNS[2:-1]), len(labels[t])])
        atomic_write_text(buf.getvalue(), os.path.join(self.output_dir, self.csv_name))
        extra = {"mean_accuracy": primary_metric(per_task, self.task_types), **self.extra}
        if self.baseline is None:
            extra["delta_m"] = None
        else:
            extra["baseline_file"] = os.fspath(self.baseline_file)
        self.summary = write_summary_json(os.path.join(self.output_dir, self.json_name), {"test": per_task}, self.baseline, extra=extra)
        log.info("per-task metrics in %s, summary %s", os.path.join(self.output_dir, self.csv_name), json.dumps({k: v for k, v in self.summary.items() if k != "tasks"}))


class PredictionWriter:
    """Evaluator handler: one CSV row per image, ``index`` (the data set's item index) then per
    task the prediction (class 0/1, or the value times ``regression_scale``) and, for binary tasks,
    ``<task>_prob`` (probability of class 1). Written atomically at the end, on rank 0.

    Args:
        task_types: task name -> ``"binary"``, ``"regression"`` or ``"ranking"``.
        output_file: the CSV path.
        index_key: batch key of the item indices.
    """

    def __init__(self, task_types: Mapping[str, str], output_file: str | os.PathLike, regression_scale: Mapping[str, float] | None = None, index_key: str = "index"):
        _check_types(task_types)
        self.task_types, self.output_file = dict(task_types), os.fspath(output_file)
        self.regression_scale, self.index_key = dict(regression_scale or {}), index_key
        self.rows: list[list] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        pred = engine.state.output[Keys.PRED]
        index = engine.state.batch.get(self.index_key) if isinstance(engine.state.batch, Mapping) else None
        n = next(iter(pred.values())).shape[0]
        index = list(range(len(self.rows), len(self.rows) + n)) if index is None else _as_list(index)
        cols = []
        for t, kind in self.task_types.items():
            p = pred[t].detach().float().cpu()
            if kind == "binary":
                prob = p.softmax(1)[:, 1] if p.ndim == 2 and p.shape[1] == 2 else torch.sigmoid(p.reshape(-1))
                cols += [binary_predictions(p).tolist(), prob.tolist()]
            else:
                cols.append((p.reshape(-1) * self.regression_scale.get(t, 1.0)).tolist())
        self.rows += [[i, *(c[k] for c in cols)] for k, i in enumerate(index)]

    def _write(self, engine: Engine) -> None:
        import ignite.distributed as idist

        if idist.get_rank() != 0:
            return
        header = ["index"]
        for t, kind in self.task_types.items():
            header += [t, f"{t}_prob"] if kind == "binary" else [t]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(self.rows)
        atomic_write_text(buf.getvalue(), self.output_file)
        log.info("%d predictions written to %s", len(self.rows), self.output_file)


#: suffixes an image file's name loses to give its case name (the longest first: dots inside a name are kept)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".nrrd", ".mha")


def _as_list(index) -> list:
    """Item names or indices of a batch as a list (names stay strings)."""
    if isinstance(index, (list, tuple)):
        return [i.item() if isinstance(i, torch.Tensor) else i for i in index]
    return torch.as_tensor(index).tolist()


def image_files(dataset_dir: str | os.PathLike | None, pattern: str = "*", image_key: str = "image",
                name_key: str = "index") -> list[dict]:
    """The items of a folder of a user's images for inference: ``{image_key: path, name_key: name}`` per file
    matching ``pattern`` (sorted), the name being the file name without its known image suffix. An empty
    ``dataset_dir`` gives no items; a missing folder, a folder without images, or two files with one name
    raise ``FileNotFoundError`` / ``ValueError`` naming the folder."""
    if not dataset_dir:
        return []
    import fnmatch

    root = os.fspath(dataset_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: dataset_dir is not a folder")
    items, seen = [], {}
    for f in sorted(os.listdir(root)):
        low = f.lower()
        suffix = next((x for x in IMAGE_SUFFIXES if low.endswith(x)), None)
        if suffix is None or not fnmatch.fnmatch(f, pattern) or not os.path.isfile(os.path.join(root, f)):
            continue
        name = f[: -len(suffix)]
        if name in seen:
            raise ValueError(f"{root}: {seen[name]} and {f} have the same name {name!r}")
        seen[name] = f
        items.append({image_key: os.path.join(root, f), name_key: name})
    if not items:
        raise ValueError(f"{root}: no image files matching {pattern!r} ({', '.join(IMAGE_SUFFIXES)})")
    return items


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """A channel-first image with the network's ``channels``: colour to grey by the channel mean, grey to
    colour by repetition, an alpha channel dropped; other mismatches raise ``ValueError``."""
    c = int(image.shape[0])
    if c == channels:
        return image
    if c == 4 and channels in (1, 3):  # RGBA
        image, c = image[:3], 3
    if channels == 1 and c == 3:
        return image.mean(0, keepdim=True)
    if channels == 3 and c == 1:
        return image.repeat(3, *([1] * (image.ndim - 1)))
    if c == channels:
        return image
    raise ValueError(f"the image has {int(image.shape[0])} channels and the network takes {channels}")
