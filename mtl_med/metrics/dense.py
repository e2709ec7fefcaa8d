"""Dense prediction metrics, accumulated over a whole split: segmentation (confusion-matrix mIoU, pixel
accuracy), depth (absolute / relative error, RMSE, delta < 1.25^k), surface normals (mean / median angle, % within
11.25 / 22.5 / 30 degrees) and delta-m against single-task networks.

Definitions (research notes, section 3.2; AdaShare section 4 "Evaluation Metrics"):

* segmentation: a C x C confusion matrix over every labelled pixel of the split (ignore index excluded);
  ``IoU_c = TP / (TP + FP + FN)``, mIoU the mean over classes present in the targets or the predictions
  (mtan and LibMTL since 2020); pixel accuracy ``sum TP / sum all``;
* depth: over every valid pixel (target > 0) of the split, ``abs_err = mean |p - g|``,
  ``rel_err = mean |p - g| / g``, ``rmse = sqrt(mean (p - g)^2)``, ``delta_k`` = fraction with
  ``max(p / g, g / p) < 1.25^k``;
* normals: angle ``arccos(<p / |p|, g / |g|>)`` in degrees over pixels with a non-zero target; mean,
  median and the fraction below 11.25, 22.5, 30 degrees.

Ratios are fractions in [0, 1] (x 100 for the papers' tables), angles degrees. ``adashare_compat=True``
reproduces AdaShare's ``test.py`` variants, for comparisons with its Tables 1-3 only: mIoU over the classes
whose confusion-matrix diagonal is non-zero (classes never predicted correctly drop out, which raises mIoU);
pixel accuracy and the depth errors as per-batch means over valid pixels averaged with batch-size weights;
"within" thresholds with ``<=`` and a 45-degree one added.

The metric names end in words :data:`mtl_med.metrics.multitask.LOWER_IS_BETTER` knows (``abs_err``,
``rel_err``, ``rmse``, ``mean_error``, ``median_error``), so :func:`dense_delta_m` is plain eq. 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .multitask import delta_m

__all__ = ["SegmentationMeter", "DepthMeter", "NormalMeter", "DenseMeters", "dense_delta_m", "NORMAL_THRESHOLDS"]

NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
#: histogram bin of the normal angles (degrees): the median is exact to half a bin
ANGLE_BIN = 1e-3


def _labels(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` scores -> argmax labels; labels pass through."""
    if pred.ndim == target.ndim + 1:
        return pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"segmentation predictions {tuple(pred.shape)} do not match targets {tuple(target.shape)}")
    return pred


class SegmentationMeter:
    """Confusion matrix over a split. ``update(pred, target)`` with scores ``(B, C, H, W)`` or labels
    ``(B, H, W)`` and targets ``(B, H, W)`` (``ignore_index`` excluded); ``compute()`` ->
    ``{"miou", "pixel_acc"}``."""

    def __init__(self, num_classes: int, ignore_index: int = -1, adashare_compat: bool = False):
        self.num_classes, self.ignore_index, self.adashare_compat = int(num_classes), int(ignore_index), bool(adashare_compat)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        self._acc_sum, self._acc_n = 0.0, 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        p = _labels(pred, target).long().cpu()
        t = target.cpu()
        keep = t != self.ignore_index
        if bool(((t[keep] < 0) | (t[keep] >= self.num_classes)).any()):
            raise ValueError(f"segmentation targets must be in [0, {self.num_classes}) or {self.ignore_index}")
        idx = t[keep] * self.num_classes + p[keep].clamp(0, self.num_classes - 1)
        cm = torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes).double()
        self.confusion += cm
        if int(keep.sum()):
            self._acc_sum += float(cm.diag().sum() / cm.sum()) * t.shape[0]
            self._acc_n += t.shape[0]

    def compute(self) -> dict[str, float]:
        cm = self.confusion  # rows: target, columns: prediction
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = tp / union.clamp_min(1e-12)
        used = tp > 0 if self.adashare_compat else union > 0
        miou = float(iou[used].mean()) if bool(used.any()) else float("nan")
        total = float(cm.sum())
        if self.adashare_compat:
            acc = self._acc_sum / self._acc_n if self._acc_n else float("nan")
        else:
            acc = float(tp.sum()) / total if total else float("nan")
        return {"miou": miou, "pixel_acc": acc}


class DepthMeter:
    """Depth errors over the valid pixels (target > 0) of a split; predictions and targets ``(B, 1, H, W)``
    or ``(B, H, W)``. ``compute()`` -> ``{"abs_err", "rel_err", "rmse", "delta1", "delta2", "delta3"}``."""

    KEYS = ("abs_err", "rel_err", "sq_err", "delta1", "delta2", "delta3")

    def __init__(self, adashare_compat: bool = False):
        self.adashare_compat = bool(adashare_compat)
        self.reset()

    def reset(self) -> None:
        self._sums = dict.fromkeys(self.KEYS, 0.0)
        self._n = 0  # valid pixels, or images in compat mode

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"depth predictions {tuple(pred.shape)} do not match targets {tuple(target.shape)}")
        p, g = pred.double().cpu(), target.double().cpu()
        valid = g > 0
        if not bool(valid.any()):
            return
        p, g = p[valid], g[valid]
        err = (p - g).abs()
        ratio = torch.maximum(p / g, g / p.clamp_min(1e-12))
        values = {"abs_err": err, "rel_err": err / g, "sq_err": err * err,
                  **{f"delta{k}": (ratio < 1.25**k).double() for k in (1, 2, 3)}}
        if self.adashare_compat:  # per-batch means, weighted by the batch size
            b = pred.shape[0]
            for k, v in values.items():
                self._sums[k] += (float(v.mean().sqrt()) if k == "sq_err" else float(v.mean())) * b
            self._n += b
        else:
            for k, v in values.items():
                self._sums[k] += float(v.sum())
            self._n += int(v.numel())

    def compute(self) -> dict[str, float]:
        if not self._n:
            return {k: float("nan") for k in ("abs_err", "rel_err", "rmse", "delta1", "delta2", "delta3")}
        m = {k: v / self._n for k, v in self._sums.items()}
        m["rmse"] = m.pop("sq_err") if self.adashare_compat else math.sqrt(m.pop("sq_err"))
        return {k: m[k] for k in ("abs_err", "rel_err", "rmse", "delta1", "delta2", "delta3")}


class NormalMeter:
    """Angles between predicted and target normals ``(B, 3, H, W)`` over pixels with a non-zero target;
    both are normalised first. The median comes from a histogram of :data:`ANGLE_BIN` degrees (exact to
    half a bin, without keeping every pixel of the split). ``compute()`` -> ``{"mean_error",
    "median_error", "within_11.25", "within_22.5", "within_30"}`` (and ``"within_45"`` in compat mode)."""

    def __init__(self, adashare_compat: bool = False):
        self.adashare_compat = bool(adashare_compat)
        self.thresholds = NORMAL_THRESHOLDS + ((45.0,) if self.adashare_compat else ())
        self.reset()

    def reset(self) -> None:
        self.hist = torch.zeros(int(round(180 / ANGLE_BIN)) + 1, dtype=torch.float64)
        self._sum, self._n = 0.0, 0
        self._within = [0.0] * len(self.thresholds)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.ndim < 2 or pred.shape[1] != 3:
            raise ValueError(f"normals must be (B, 3, ...) of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        p, g = pred.double().cpu(), target.double().cpu()
        valid = g.norm(dim=1) > 0
        if not bool(valid.any()):
            return
        cos = (F.normalize(p, dim=1) * F.normalize(g, dim=1)).sum(1)[valid].clamp(-1, 1)
        angle = torch.rad2deg(torch.acos(cos))
        self._sum += float(angle.sum())
        self._n += int(angle.numel())
        for i, th in enumerate(self.thresholds):
            self._within[i] += float((angle <= th).sum() if self.adashare_compat else (angle < th).sum())
        self.hist += torch.bincount(torch.round(angle / ANGLE_BIN).long(), minlength=self.hist.numel()).double()

    def compute(self) -> dict[str, float]:
        if not self._n:
            return {"mean_error": float("nan"), "median_error": float("nan"), **{f"within_{t:g}": float("nan") for t in self.thresholds}}
        cum = torch.cumsum(self.hist, 0)
        # the median of n values: the middle one, or the mean of the two middle ones
        lo = int(torch.searchsorted(cum, torch.tensor((self._n - 1) // 2 + 1, dtype=torch.float64)))
        hi = int(torch.searchsorted(cum, torch.tensor(self._n // 2 + 1, dtype=torch.float64)))
        median = (lo + hi) / 2 * ANGLE_BIN
        return {"mean_error": self._sum / self._n, "median_error": median,
                **{f"within_{t:g}": w / self._n for t, w in zip(self.thresholds, self._within)}}


class DenseMeters:
    """One meter per task by kind: ``kinds = {task: "seg" | "depth" | "normal"}``; ``update(outputs,
    targets)`` with dicts of tensors, ``compute()`` -> ``{task: metrics}``."""

    def __init__(self, kinds: Mapping[str, str], num_classes: int | None = None, ignore_index: int = -1, adashare_compat: bool = False):
        self.meters = {}
        for task, kind in kinds.items():
            if kind == "seg":
                if num_classes is None:
                    raise ValueError("a segmentation task needs num_classes")
                self.meters[task] = SegmentationMeter(num_classes, ignore_index, adashare_compat)
            elif kind == "depth":
                self.meters[task] = DepthMeter(adashare_compat)
            elif kind == "normal":
                self.meters[task] = NormalMeter(adashare_compat)
            else:
                raise ValueError(f"task {task!r}: kind must be 'seg', 'depth' or 'normal', got {kind!r}")

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()

    def update(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
        for task, m in self.meters.items():
            if task in outputs and task in targets:
                m.update(outputs[task], targets[task])

    def compute(self) -> dict[str, dict[str, float]]:
        return {task: m.compute() for task, m in self.meters.items()}


def dense_delta_m(multi: Mapping[str, Mapping[str, float]], single: Mapping[str, Mapping[str, float]]) -> float:
    """Eq. 1 (Maninis et al.; Branched MTN eq. 1) as a mean over tasks: each task's term is the mean signed
    relative difference of its metrics in ``multi`` against the single-task networks' ``single[task][metric]``
    (lower-is-better metrics count negatively), and the tasks weigh equally however many metrics each
    reports. A fraction, x 100 for percent."""
    terms = []
    for t, ms in multi.items():
        if not ms:
            continue
        base = single.get(t)
        if base is None:
            raise KeyError(f"no single-task baseline for task {t!r}")
        terms.append(delta_m({f"{t}/{k}": v for k, v in ms.items()}, {f"{t}/{k}": base[k] for k in ms if k in base}))
    if not terms:
        raise ValueError("dense_delta_m needs at least one task metric")
    return sum(terms) / len(terms)
