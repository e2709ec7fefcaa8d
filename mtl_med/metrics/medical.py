"""Metrics of the SFG paper's pelvis experiment (section 5.2, Table 2), for any CT range and organ table: the pelvis
application's (:mod:`mtl_med.pelvis`: ``PSNR_DATA_RANGE_HU``, ``PSNR_ORGANS``, ``DICE_ORGANS``, ``LABEL_TABLE``)
are passed by its bundle's configs and its tables.

* CT synthesis (Table 2a): PSNR over the whole volume, the bones, all organ labels and each of prostate,
  bladder and rectum; and the mean absolute error in HU.
* Segmentation (Table 2b): Dice per organ (left / right femoral head, prostate, bladder, rectum) and their mean.

PSNR convention: ``PSNR = 10 log10(R^2 / MSE)`` with the data range ``R`` of the CT intensity range,
``R = 2500 - (-1024) = 3524`` HU for the pelvis (A.3: CT range [-1024, 2500]); MSE in HU^2 over the voxels of the region.
The whole-volume value is MONAI's ``PSNRMetric(max_val=R)``; a region is the same formula over a mask (MONAI
has no masked PSNR). A region with no voxels gives NaN, a perfect match +inf. Dice is MONAI's
``compute_dice`` on one-hot labels; an organ absent from the ground truth gives NaN (left out of the mean).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, compute_dice
from monai.networks.utils import one_hot

from mtl_med.io import atomic_write, atomic_write_json, json_finite

__all__ = [
    "psnr",
    "region_psnr",
    "region_mae",
    "dice_per_label",
    "case_metrics",
    "summarize_cases",
    "write_case_csv",
    "write_metrics_summary",
    "uncertainty_quality",
]

def _t(x: Any, dtype=torch.float64) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype)


def psnr(pred_hu: Any, target_hu: Any, data_range: float) -> float:
    """Whole-volume PSNR (dB) with MONAI's ``PSNRMetric``; +inf for identical volumes."""
    p, t = _t(pred_hu), _t(target_hu)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
    value = PSNRMetric(max_val=float(data_range), reduction="mean")(p[None, None], t[None, None])
    return float(value.reshape(-1)[0])


def region_psnr(pred_hu: Any, target_hu: Any, mask: Any = None, *, data_range: float) -> float:
    """PSNR (dB) over the voxels where ``mask`` is non-zero (whole volume when None); NaN for an empty mask."""
    if mask is None:
        return psnr(pred_hu, target_hu, data_range)
    p, t, m = _t(pred_hu), _t(target_hu), _t(mask, torch.bool)
    if not (p.shape == t.shape == m.shape):
        raise ValueError(f"shapes differ: prediction {tuple(p.shape)}, target {tuple(t.shape)}, mask {tuple(m.shape)}")
    n = int(m.sum())
    if n == 0:
        return math.nan
    mse = float(((p - t)[m] ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(float(data_range) ** 2 / mse)


def region_mae(pred_hu: Any, target_hu: Any, mask: Any = None) -> float:
    """Mean absolute error (HU) over ``mask`` (whole volume when None); NaN for an empty mask."""
    p, t = _t(pred_hu), _t(target_hu)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
    d = (p - t).abs()
    if mask is not None:
        m = _t(mask, torch.bool)
        if m.shape != p.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} differs from {tuple(p.shape)}")
        d = d[m]
    return float(d.mean()) if d.numel() else math.nan


def dice_per_label(pred_labels: Any, target_labels: Any, labels: Mapping[str, int]) -> dict[str, float]:
    """Dice of each label (``name -> value``) with MONAI's ``compute_dice``; NaN where the label is absent
    from the target."""
    p, t = _t(pred_labels, torch.long), _t(target_labels, torch.long)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
    k = max(max(labels.values()), int(p.max()), int(t.max())) + 1
    dice = compute_dice(one_hot(p[None, None], k), one_hot(t[None, None], k), include_background=True, ignore_empty=True)
    return {name: float(dice[0, idx]) for name, idx in labels.items()}


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def case_metrics(
    sct_hu: Any = None,
    ct_hu: Any = None,
    seg: Any = None,
    label: Any = None,
    bone: Any = None,
    *,
    data_range: float,
    psnr_organs: Mapping[str, int],
    dice_organs: Mapping[str, int],
    bone_threshold_hu: float = 250.0,
) -> dict[str, float]:
    """One case's row of Table 2: ``psnr_overall``, ``psnr_bones``, ``psnr_organs``, ``psnr_<organ>``,
    ``mae_overall`` (HU), ``mae_bones``, ``dice_<organ>`` and ``dice_mean``.

    Args:
        sct_hu, ct_hu: synthetic and true CT in HU on the same grid (CT metrics skipped if either is None).
        seg, label: predicted and true label maps (organ regions and Dice need ``label``).
        bone: bone mask; None: true CT >= ``bone_threshold_hu``.
        psnr_organs: organ name -> label for the per-organ PSNR columns ("organs" is every label > 0).
        dice_organs: organ name -> label for the Dice columns.
        data_range: the PSNR's data range R (HU): the width of the CT range.
    """
    row: dict[str, float] = {}
    if sct_hu is not None and ct_hu is not None:
        ct = _t(ct_hu)
        bones = _t(bone, torch.bool) if bone is not None else ct >= bone_threshold_hu
        row["psnr_overall"] = region_psnr(sct_hu, ct, None, data_range=data_range)
        row["psnr_bones"] = region_psnr(sct_hu, ct, bones, data_range=data_range)
        if label is not None:
            lab = _t(label, torch.long)
            row["psnr_organs"] = region_psnr(sct_hu, ct, lab > 0, data_range=data_range)
            for name, idx in psnr_organs.items():
                row[f"psnr_{name}"] = region_psnr(sct_hu, ct, lab == idx, data_range=data_range)
        row["mae_overall"] = region_mae(sct_hu, ct)
        row["mae_bones"] = region_mae(sct_hu, ct, bones) if bool(bones.any()) else math.nan
    if seg is not None and label is not None:
        dice = dice_per_label(seg, label, dice_organs)
        row.update({f"dice_{k}": v for k, v in dice.items()})
        row["dice_mean"] = _nanmean(list(dice.values()))
    return row


def summarize_cases(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Metric -> ``{"mean", "std", "n"}`` over cases (population std as Table 2; NaN / inf cases left out)."""
    numeric = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)  # noqa: E731
    names = []
    for r in rows:  # text columns (e.g. "resampled_to_mr") are notes, not metrics
        names += [k for k, v in r.items() if k != "case" and k not in names and numeric(v)]
    out = {}
    for name in names:
        vals = [float(r[name]) for r in rows if name in r and r[name] is not None and math.isfinite(float(r[name]))]
        out[name] = {
            "mean": float(np.mean(vals)) if vals else math.nan,
            "std": float(np.std(vals)) if vals else math.nan,
            "n": len(vals),
        }
    return out


def write_case_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """One row per case (first column "case"), written atomically."""
    cols = ["case"]
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_metrics_summary(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, data_range: float,
                          label_table: Mapping[int, str], **extra: Any) -> dict:
    """Summary JSON ``{"num_cases", "psnr_data_range_hu", "labels", "metrics": {name: {mean, std, n}}, ...}``
    (``data_range``: the PSNR's, HU; ``label_table``: label -> organ name), atomic."""
    summary = {
        "num_cases": len(rows),
        "psnr_data_range_hu": data_range,
        "labels": {str(k): v for k, v in label_table.items()},
        "metrics": summarize_cases(rows),
        **extra,
    }
    atomic_write_json(json_finite(summary), path)
    return summary


def uncertainty_quality(sct_std: Any, sct_abs_error: Any, seg_uncertainty: Any, seg_wrong: Any, mask: Any = None,
                        bins: int = 10) -> dict[str, Any]:
    """Whether the posterior's uncertainty points at its errors (SFG paper, section 5.2's uncertainty maps), over
    the voxels of ``mask`` (default: all):

    - ``std_error_spearman``: Spearman's rho between the per-voxel sCT standard deviation and absolute error;
    - ``error_by_std_decile``: the mean absolute error (HU) in each tenth of the voxels ordered by their std,
      and ``std_decile_edges`` (HU);
    - ``label_error_auc``: the area under the ROC curve of the segmentation's uncertainty (e.g. vote entropy)
      as a detector of wrong labels (0.5: no better than chance; NaN when every label is right or wrong), and
      ``label_error_rate``.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    keep = np.ones(np.shape(sct_std), bool) if mask is None else np.asarray(mask, bool)
    std, err = np.asarray(sct_std, float)[keep], np.asarray(sct_abs_error, float)[keep]
    unc, wrong = np.asarray(seg_uncertainty, float)[keep], np.asarray(seg_wrong, bool)[keep]
    edges = np.quantile(std, np.linspace(0.0, 1.0, bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], std, side="right"), 0, bins - 1)
    by_bin = [float(err[which == b].mean()) if np.any(which == b) else math.nan for b in range(bins)]
    both = 0 < wrong.sum() < wrong.size
    return {
        "voxels": int(keep.sum()),
        "std_error_spearman": float(spearmanr(std, err).statistic),
        "error_by_std_decile": by_bin,
        "std_decile_edges": [float(e) for e in edges],
        "label_error_auc": float(roc_auc_score(wrong, unc)) if both else math.nan,
        "label_error_rate": float(wrong.mean()),
    }

