"""Per-task metrics and the multi-task performance delta-m.

Binary tasks: accuracy, precision and recall (Task Routing, section 4.4); regression: mean absolute
error (SFG, Table 1); ranking: Kendall's tau between scores and targets (Selective Sharing, Table 2). ``delta_m`` is eq. 1 of Vandenhende et al. (after Maninis et al. 2019):
``delta_m = (1/T) sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i`` with ``l_i = 1`` when lower is better.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from sklearn.metrics import accuracy_score, mean_absolute_error, precision_score, recall_score

from mtl_med.io import atomic_write_json, atomic_write_text, json_finite

__all__ = [
    "LOWER_IS_BETTER",
    "binary_predictions",
    "binary_classification_metrics",
    "regression_metrics",
    "ranking_metrics",
    "multitask_metrics",
    "delta_m",
    "summarize_runs",
    "write_task_csv",
    "write_summary_json",
]

#: metrics for which a lower value is better (``l_i = 1`` in eq. 1)
LOWER_IS_BETTER = frozenset({"mae", "rmse", "mse", "loss", "error", "mean_error", "median_error", "abs_err", "rel_err"})


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def binary_predictions(output, threshold: float = 0.0) -> np.ndarray:
    """0/1 predictions from a network output: ``(B, 2)`` logits -> argmax; ``(B,)``/``(B, 1)``
    logits -> ``output > threshold`` (0 for logits; use 0.5 for probabilities)."""
    out = _np(output)
    if out.ndim == 2 and out.shape[1] == 2:
        return out.argmax(1).astype(np.int64)
    if out.ndim == 2 and out.shape[1] != 1:
        raise ValueError(f"binary output must be (B,), (B, 1) or (B, 2), got shape {out.shape}")
    return (out.reshape(-1) > threshold).astype(np.int64)


def binary_classification_metrics(y_pred, y_true) -> dict[str, float]:
    """Accuracy, precision and recall of 0/1 predictions (precision/recall are 0 when undefined)."""
    p, t = _np(y_pred).reshape(-1).astype(np.int64), _np(y_true).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"predictions and targets differ in size: {p.shape} vs {t.shape}")
    return {
        "accuracy": float(accuracy_score(t, p)),
        "precision": float(precision_score(t, p, zero_division=0)),
        "recall": float(recall_score(t, p, zero_division=0)),
    }


def regression_metrics(y_pred, y_true, scale: float = 1.0) -> dict[str, float]:
    """Mean absolute error, after multiplying both by ``scale`` (e.g. 100 to report UTKFace ages
    in years when the network was trained on age / 100, SFG appendix A.2)."""
    p, t = _np(y_pred).reshape(-1) * scale, _np(y_true).reshape(-1) * scale
    if p.shape != t.shape:
        raise ValueError(f"predictions and targets differ in size: {p.shape} vs {t.shape}")
    return {"mae": float(mean_absolute_error(t, p))}


def ranking_metrics(scores, y_true) -> dict[str, float]:
    """Kendall's tau-b between predicted scores and graded targets (Selective Sharing, Table 2 reports
    tau x 100); 0 when either side is constant (tau undefined)."""
    from scipy.stats import kendalltau

    p, t = _np(scores).reshape(-1).astype(np.float64), _np(y_true).reshape(-1).astype(np.float64)
    if p.shape != t.shape:
        raise ValueError(f"scores and targets differ in size: {p.shape} vs {t.shape}")
    tau = kendalltau(p, t).statistic if len(p) > 1 else float("nan")
    return {"kendall_tau": 0.0 if math.isnan(tau) else float(tau)}


def multitask_metrics(
    outputs: Mapping[str, object],
    targets: Mapping[str, object],
    task_types: Mapping[str, str],
    regression_scale: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: metrics}`` for ``task_types[task]`` in ``{"binary", "regression", "ranking"}``."""
    res = {}
    for task, kind in task_types.items():
        if task not in outputs or task not in targets:
            continue
        if kind == "binary":
            res[task] = binary_classification_metrics(binary_predictions(outputs[task]), targets[task])
        elif kind == "regression":
            res[task] = regression_metrics(outputs[task], targets[task], (regression_scale or {}).get(task, 1.0))
        elif kind == "ranking":
            res[task] = ranking_metrics(outputs[task], targets[task])
        else:
            raise ValueError(f"task {task!r}: unknown type {kind!r} (binary, regression or ranking)")
    return res


def delta_m(
    multi: Mapping[str, float],
    single: Mapping[str, float],
    lower_is_better: Mapping[str, bool] | Iterable[str] | None = None,
) -> float:
    """Eq. 1: the mean relative gain of a multi-task model over single-task baselines (a fraction;
    multiply by 100 for percent).

    Args:
        multi: measure of the multi-task model per task (or per task/metric key).
        single: the single-task baseline's measure for the same keys.
        lower_is_better: keys whose measure is better when lower (``l_i = 1``), as a set of keys
            or a mapping key -> bool; by default a key counts as lower-is-better when its last
            ``/``-separated part is in :data:`LOWER_IS_BETTER`.
    """
    keys = list(multi)
    if not keys:
        raise ValueError("delta_m needs at least one task")
    missing = [k for k in keys if k not in single]
    if missing:
        raise KeyError(f"no single-task baseline for {missing}")
    if lower_is_better is None:
        lower = {k: k.rsplit("/", 1)[-1].lower() in LOWER_IS_BETTER for k in keys}
    elif isinstance(lower_is_better, Mapping):
        lower = {k: bool(lower_is_better.get(k, False)) for k in keys}
    else:
        s = set(lower_is_better)
        lower = {k: k in s for k in keys}
    total = 0.0
    for k in keys:
        b = float(single[k])
        if b == 0:
            raise ZeroDivisionError(f"baseline measure of {k!r} is 0; delta_m is undefined")
        total += (-1.0 if lower[k] else 1.0) * (float(multi[k]) - b) / b
    return total / len(keys)


def summarize_runs(runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, sample standard deviation (ddof 1; 0 for one run) and count per task and metric over
    runs (seeds or cases): ``runs[run][task][metric] -> value``."""
    values: dict[str, dict[str, list[float]]] = {}
    for per_task in runs.values():
        for task, metrics in per_task.items():
            for metric, v in metrics.items():
                values.setdefault(task, {}).setdefault(metric, []).append(float(v))
    return {
        task: {
            m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
            for m, v in metrics.items()
        }
        for task, metrics in values.items()
    }


def write_task_csv(path: str | os.PathLike, runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
    """One row per run, task and metric: columns ``run, task, metric, value`` (written atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "task", "metric", "value"])
    for run, per_task in runs.items():
        for task, metrics in per_task.items():
            for metric, v in metrics.items():
                w.writerow([run, task, metric, repr(float(v))])
    atomic_write_text(buf.getvalue(), path)


def write_summary_json(
    path: str | os.PathLike,
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    baseline: Mapping[str, float] | None = None,
    lower_is_better: Mapping[str, bool] | Iterable[str] | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Summary JSON ``{"tasks": summarize_runs(runs), "num_runs": n[, "delta_m": ...]}``.

    With ``baseline`` (``"task/metric" -> single-task value``), ``delta_m`` of the mean over runs is
    added, with its mean and std over the individual runs. Written atomically; returned.
    """
    summary: dict = {"num_runs": len(runs), "tasks": summarize_runs(runs)}
    if baseline:
        def flat(per_task):
            return {f"{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items() if f"{t}/{m}" in baseline}

        means = {f"{t}/{m}": s["mean"] for t, ms in summary["tasks"].items() for m, s in ms.items() if f"{t}/{m}" in baseline}
        per_run = [delta_m(flat(r), baseline, lower_is_better) for r in runs.values() if flat(r)]
        summary["delta_m"] = {
            "of_mean": delta_m(means, baseline, lower_is_better),
            "mean": float(np.mean(per_run)),
            "std": float(np.std(per_run, ddof=1)) if len(per_run) > 1 else 0.0,
            "keys": sorted(means),
        }
    if extra:
        summary.update(extra)
    atomic_write_json(json_finite(summary), path)
    return summary
