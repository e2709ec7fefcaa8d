"""Engine pieces for dense multi-task prediction (segmentation, depth, surface normals; the dense bundle):
output channels and losses from task kinds, a split-level validation score, a metrics report with delta-m,
TensorBoard images and per-task prediction files.

A task's *kind* says what it predicts: ``"seg"`` (``num_classes`` logits), ``"depth"`` (1 value),
``"normal"`` (3 values, normalised by the metric and the loss), ``"edge"`` / ``"keypoint"`` (1 value).
Metrics (:mod:`mtl_med.metrics.dense`) are kept for seg, depth and normal tasks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys

from mtl_med.engines.vision import PerTaskScore, _as_list, read_baseline_tasks
from mtl_med.io import atomic_write_text
from mtl_med.losses.dense import dense_losses
from mtl_med.metrics.dense import DenseMeters, DepthMeter, NormalMeter, SegmentationMeter, dense_delta_m

__all__ = [
    "DENSE_KINDS",
    "dense_out_channels",
    "dense_task_losses",
    "dense_primary",
    "DenseScore",
    "DenseReport",
    "DenseImageHandler",
    "DensePredictionWriter",
    "load_dense_baseline",
    "load_dense_split",
]

log = logging.getLogger(__name__)

DENSE_KINDS = ("seg", "depth", "normal", "edge", "keypoint")
#: the higher-is-better measure of each kind that the validation score averages
PRIMARY = {"seg": "miou", "depth": "delta1", "normal": "within_22.5"}


def _check_kinds(kinds: Mapping[str, str]) -> None:
    bad = {t: k for t, k in kinds.items() if k not in DENSE_KINDS}
    if bad:
        raise ValueError(f"unknown dense task kinds {bad}; expected one of {DENSE_KINDS}")


def dense_out_channels(kinds: Mapping[str, str], num_classes: int | None = None) -> dict[str, int]:
    """Task name -> network outputs: ``num_classes`` for seg, 3 for normals, 1 otherwise."""
    _check_kinds(kinds)
    if "seg" in kinds.values() and not num_classes:
        raise ValueError("a segmentation task needs num_classes")
    return {t: int(num_classes) if k == "seg" else 3 if k == "normal" else 1 for t, k in kinds.items()}


def dense_task_losses(kinds: Mapping[str, str], ignore_index: int = -1) -> dict:
    """Task name -> loss (:func:`mtl_med.losses.dense.dense_losses`)."""
    _check_kinds(kinds)
    return dense_losses(kinds, ignore_index)


def dense_primary(per_task: Mapping[str, Mapping[str, float]], kinds: Mapping[str, str]) -> float:
    """Mean over the metered tasks of mIoU (seg), delta < 1.25 (depth) and the fraction within 22.5
    degrees (normals): fractions, higher is better; the checkpoint and early-stopping score."""
    vals = [per_task[t][PRIMARY[k]] for t, k in kinds.items() if k in PRIMARY and t in per_task]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _all_reduce(meter) -> None:
    """Sum a meter's accumulators over DDP ranks (they are all sums), so every rank scores the split."""
    import ignite.distributed as idist

    if idist.get_world_size() < 2:
        return
    for name, v in list(vars(meter).items()):
        if not name.startswith("_") and name not in ("confusion", "hist"):
            continue
        if isinstance(v, torch.Tensor):
            setattr(meter, name, idist.all_reduce(v.to(idist.device())).cpu())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            setattr(meter, name, type(v)(idist.all_reduce(torch.tensor(float(v), dtype=torch.float64, device=idist.device())).item()))
        elif isinstance(v, dict):
            setattr(meter, name, {k: float(idist.all_reduce(torch.tensor(float(x), dtype=torch.float64, device=idist.device())).item()) for k, x in v.items()})
        elif isinstance(v, list):
            t = idist.all_reduce(torch.tensor(v, dtype=torch.float64, device=idist.device())).cpu()
            setattr(meter, name, t.tolist())


def _pred_label(output: Mapping) -> tuple:
    return output[Keys.PRED], output[Keys.LABEL]


class DenseScore(PerTaskScore):
    """Validation score over a whole split (:func:`dense_primary`), for ``key_val_metric``, checkpoint
    selection and early stopping. On completion every task's metrics also go to ``engine.state.metrics``
    as ``"<task>/<metric>"`` (TensorBoardStatsHandler logs them; :class:`DenseReport` writes them).

    Args:
        kinds: task name -> kind.
        num_classes: segmentation classes.
        ignore_index: label of unlabelled pixels.
        adashare_compat: AdaShare's metric variants (:mod:`mtl_med.metrics.dense`).
    """

    def __init__(self, kinds: Mapping[str, str], num_classes: int | None = None, ignore_index: int = -1,
                 adashare_compat: bool = False, output_transform=None):
        _check_kinds(kinds)
        self.kinds = dict(kinds)
        self.meters = DenseMeters({t: k for t, k in kinds.items() if k in PRIMARY}, num_classes, ignore_index, adashare_compat)
        self.results: dict[str, dict[str, float]] = {}
        super().__init__(output_transform=output_transform or _pred_label)

    def reset(self) -> None:
        self.meters.reset()
        self.reduced = False

    def update(self, output) -> None:
        pred, label = output
        self.meters.update({t: v.detach().float() for t, v in pred.items()}, label)

    def compute(self) -> float:
        if not self.reduced:  # once per run: a second sum over ranks would count every pixel twice
            for m in self.meters.meters.values():
                _all_reduce(m)
            self.reduced = True
        self.results = self.meters.compute()
        return dense_primary(self.results, self.kinds)

def load_dense_baseline(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the single-task run whose ``metrics.json`` (:class:`DenseReport`) is
    ``path``."""
    not_metrics = "not a dense metrics JSON (no 'tasks' mapping)"
    tasks = read_baseline_tasks(path, "single-task baseline metrics not found (evaluate the single_task variant first)", not_metrics)
    if not all(isinstance(v, dict) for v in tasks.values()):
        raise ValueError(f"{path}: {not_metrics}")
    return tasks


class DenseReport:
    """Evaluator handler: at the end of a run, ``output_dir/json_name`` with every task's metrics (from
    :class:`DenseScore`'s ``"<task>/<metric>"`` entries), the score and, given a single-task run's
    metrics JSON, delta-m (eq. 1). Written on rank 0 only.

    Args:
        output_dir: folder of the file.
        baseline_file: the single-task run's metrics JSON (``None``: no delta-m).
        score_name: the key metric's name in ``engine.state.metrics``.
        json_name: file name.
        extra: more entries (variant, checkpoint, ...).
    """

    def __init__(self, output_dir: str | os.PathLike, baseline_file: str | os.PathLike | None = None, score_name: str = "val_score",
                 json_name: str = "metrics.json", extra: Mapping | None = None):
        self.output_dir, self.json_name, self.score_name = os.fspath(output_dir), json_name, score_name
        self.baseline_file = baseline_file
        self.baseline = load_dense_baseline(baseline_file) if baseline_file else None
        self.extra = dict(extra or {})
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import ignite.distributed as idist

        tasks: dict[str, dict[str, float]] = {}
        for key, v in engine.state.metrics.items():
            if "/" in key:
                t, m = key.split("/", 1)
                tasks.setdefault(t, {})[m] = float(v)
        summary = {"tasks": tasks, "score": float(engine.state.metrics.get(self.score_name, float("nan"))), **self.extra}
        if self.baseline is not None:
            # eq. 1 divides by the baseline: a metric the single-task run scored 0 (or NaN) on is left out, and named
            usable = {t: {m: v for m, v in ms.items() if np.isfinite(v) and np.isfinite(self.baseline.get(t, {}).get(m, np.nan))
                          and self.baseline[t][m] != 0} for t, ms in tasks.items()}
            summary["delta_m_excluded"] = sorted(f"{t}/{m}" for t, ms in tasks.items() for m in ms if m not in usable[t])
            usable = {t: ms for t, ms in usable.items() if ms}
            summary["delta_m"] = dense_delta_m(usable, self.baseline) if usable else None
            summary["baseline_file"] = os.fspath(self.baseline_file)
        else:
            summary["delta_m"] = None
        self.summary = summary
        if idist.get_rank() == 0:
            path = os.path.join(self.output_dir, self.json_name)
            atomic_write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n", path)
            log.info("dense metrics in %s: score %.4f, delta_m %s", path, summary["score"], summary["delta_m"])


def _as_rgb(x: torch.Tensor, kind: str, num_classes: int | None = None) -> torch.Tensor:
    """One task's map ``(C, H, W)`` as an RGB image in [0, 1] for viewing."""
    x = x.detach().float().cpu()
    if kind == "seg":
        lab = x.argmax(0) if x.ndim == 3 else x
        n = max(int(num_classes or (int(lab.max()) + 1)), 2)
        hue = (lab.clamp(min=0).float() / n)[None]
        rgb = torch.cat([(hue * 6 + s).remainder(6).sub(3).abs().sub(1).clamp(0, 1) for s in (0.0, 4.0, 2.0)])
        return torch.where(lab[None] < 0, torch.zeros_like(rgb), rgb)
    if kind == "normal":
        return (F.normalize(x, dim=0) + 1) / 2
    v = x[0] if x.ndim == 3 else x
    lo, hi = float(v.min()), float(v.max())
    v = (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)
    return v[None].expand(3, -1, -1)


class DenseImageHandler:
    """Evaluator handler: TensorBoard images of the first example of the first batch of each run: the
    input, then per task the prediction and the target (``<tag>/<task>/pred``, ``.../target``), at the
    evaluator's epoch (the trainer's epoch under ``ValidationHandler``)."""

    def __init__(self, summary_writer, kinds: Mapping[str, str], num_classes: int | None = None, tag: str = "val"):
        _check_kinds(kinds)
        self.writer, self.kinds, self.num_classes, self.tag = summary_writer, dict(kinds), num_classes, tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self._done = False

    def __call__(self, engine: Engine) -> None:
        import ignite.distributed as idist

        if getattr(self, "_done", False):
            return
        self._done = True
        if idist.get_rank() != 0 or self.writer is None:
            return
        out, step = engine.state.output, int(engine.state.epoch)
        image = out[Keys.IMAGE][0].detach().float().cpu()
        image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
        self.writer.add_image(f"{self.tag}/input", image.clamp(0, 1), step)
        for t, kind in self.kinds.items():
            if t in out[Keys.PRED]:
                self.writer.add_image(f"{self.tag}/{t}/pred", _as_rgb(out[Keys.PRED][t][0], kind, self.num_classes), step)
            if t in out[Keys.LABEL]:
                self.writer.add_image(f"{self.tag}/{t}/target", _as_rgb(out[Keys.LABEL][t][0], kind, self.num_classes), step)


class DensePredictionWriter:
    """Evaluator handler for inference: per example and task, ``output_dir/<task>/<index>.npy`` (seg: int16
    labels (H, W); normals: unit vectors (H, W, 3); others (H, W) float32) and ``<index>.png`` to look at.
    Written on rank 0 only (inference runs on one process).

    Args:
        output_dir: folder of the task folders.
        kinds: task name -> kind.
        num_classes: segmentation classes (for the PNG colours).
        index_key: batch key of the item indices.
        png: also write the PNGs.
    """

    def __init__(self, output_dir: str | os.PathLike, kinds: Mapping[str, str], num_classes: int | None = None,
                 index_key: str = "index", png: bool = True):
        _check_kinds(kinds)
        self.output_dir, self.kinds, self.num_classes = os.fspath(output_dir), dict(kinds), num_classes
        self.index_key, self.png = index_key, bool(png)
        self.count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.count = 0
        for t in self.kinds:
            os.makedirs(os.path.join(self.output_dir, t), exist_ok=True)

    def __call__(self, engine: Engine) -> None:
        from PIL import Image

        pred = engine.state.output[Keys.PRED]
        n = next(iter(pred.values())).shape[0]
        batch = engine.state.batch
        index = batch.get(self.index_key) if isinstance(batch, Mapping) else None
        index = list(range(self.count, self.count + n)) if index is None else _as_list(index)
        self.count += n
        for t, kind in self.kinds.items():
            if t not in pred:
                continue
            p = pred[t].detach().float().cpu()
            for b, i in enumerate(index):
                if kind == "seg":
                    arr = p[b].argmax(0).numpy().astype(np.int16)
                elif kind == "normal":
                    arr = F.normalize(p[b], dim=0).permute(1, 2, 0).numpy().astype(np.float32)
                else:
                    arr = p[b, 0].numpy().astype(np.float32)
                base = os.path.join(self.output_dir, t, str(i))
                np.save(base + ".npy", arr)
                if self.png:
                    rgb = _as_rgb(p[b], kind, self.num_classes).permute(1, 2, 0).numpy()
                    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(base + ".png")


def load_dense_split(dataset: str, split: str, data_root: str | os.PathLike | None, tasks, transform=None, **kwargs):
    """The bundle's data: reader ``DENSE_DATASETS[dataset]`` on ``data_root`` for ``split``, returning only
    ``tasks`` (names or a ``{task: kind}`` mapping). A missing synthetic set says how to make it."""
    from mtl_med.data.dense import DENSE_DATASETS, DenseFileNotFoundError

    if dataset not in DENSE_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DENSE_DATASETS)}, got {dataset!r}")
    if data_root is None or not os.path.isdir(data_root):
        hint = ("; render it with: python -m data_prep.synthetic_scenes --out <data_root> --n 200" if dataset == "synthetic"
                else "; point data_root at a local copy")
        raise DenseFileNotFoundError(data_root or "data_root", f"{dataset} data folder not found{hint}")
    return DENSE_DATASETS[dataset](data_root, split, tasks=list(tasks), transform=transform, **kwargs)
