"""Table 2 evaluation over a datalist section: per-case metrics CSV (rewritten after every case, so an interrupted
run keeps its finished rows, per rank under ``torch.distributed``) and a summary JSON computed from it."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mtl_med.errors import CaseFailures, InputError, as_bool
from mtl_med.inference.cases import list_cases
from mtl_med.inference.distributed import barrier, rank_world
from mtl_med.inference.publish import check_output_dir

if TYPE_CHECKING:
    from mtl_med.inference.predictor import VolumePredictor

__all__ = ["SUMMARY_METRICS", "CaseMetrics", "format_metrics", "read_case_csv", "evaluate_cases"]

logger = logging.getLogger("mtl_med.inference")

# the metrics a log line and the summary print name
SUMMARY_METRICS = ("psnr_overall", "psnr_bones", "psnr_organs", "mae_overall", "dice_mean")


class CaseMetrics:
    """Table 2 metrics of one case on the preprocessed (common, A.3: 1.46 mm) grid, when its item has a CT and / or
    labels (:func:`~mtl_med.metrics.medical.case_metrics`): the bone region is the item's "bone" mask, else
    the true CT at or above ``bone_threshold_hu``; ``psnr_organs`` / ``dice_organs`` (organ name -> label) name
    the per-organ columns and ``data_range`` (HU) is the PSNR's."""

    def __init__(self, data_range: float, psnr_organs: Mapping[str, int], dice_organs: Mapping[str, int],
                 bone_threshold_hu: float = 250.0):
        self.bone_threshold_hu = float(bone_threshold_hu)
        self.data_range = float(data_range)
        self.columns = {"data_range": self.data_range, "psnr_organs": dict(psnr_organs),
                        "dice_organs": dict(dice_organs)}

    def __call__(self, data: Mapping[str, Any], maps: Mapping[str, Any], item: Mapping[str, Any],
                 to_hu: Callable[[Any], Any]) -> dict:
        """``data``: the preprocessed item; ``maps``: the outputs on its grid (``sct`` in HU, ``seg``);
        ``item``: the item as given (which truths it has); ``to_hu``: network scale -> HU of the true CT."""
        import numpy as np
        import torch

        from mtl_med.metrics.medical import case_metrics

        def arr(key):
            v = data.get(key) if key in item else None
            return None if v is None else torch.as_tensor(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v))[0]

        ct, label, bone = arr("ct"), arr("label"), arr("bone")
        if ct is None and label is None:
            return {}
        m = case_metrics(
            maps["sct"][0] if ct is not None else None, to_hu(ct.float()) if ct is not None else None,
            maps["seg"][0] if label is not None else None, label.round().long() if label is not None else None,
            (bone > 0.5) if bone is not None else None, bone_threshold_hu=self.bone_threshold_hu, **self.columns,
        )
        if data.get("resampled_to_mr"):  # truth_geometry "resample": say so beside the numbers
            m["resampled_to_mr"] = "+".join(data["resampled_to_mr"])
        return m


def format_metrics(m: Mapping[str, Any]) -> str:
    keys = [k for k in SUMMARY_METRICS if k in m]
    return ", ".join(f"{k} {m[k]:.2f}" if "dice" not in k else f"{k} {m[k]:.3f}" for k in keys)


def read_case_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a per-case metrics CSV (:func:`~mtl_med.metrics.medical.write_case_csv`), numbers as floats and
    empty cells left out; ``[]`` when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []

    def value(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: (v if k == "case" else value(v)) for k, v in r.items() if v != "" and k is not None}
                for r in csv.DictReader(f)]


class _CaseCsv:
    """The evaluation's CSV and, under ``torch.distributed``, each rank's part ``<csv>.rank<r>.csv``."""

    def __init__(self, mdir: Path, csv_name: str, order: Mapping[str, int], rank: int, world: int):
        self.path, self.order, self.rank, self.world = mdir / csv_name, order, rank, world
        stem, suffix = self.path.stem, self.path.suffix
        self.mine = self.path if world == 1 else mdir / f"{stem}.rank{rank}{suffix}"
        self.rows: dict[str, dict] = {}

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*{self.path.suffix}"))

    def earlier(self) -> dict[str, dict]:
        """Rows of an interrupted run (its CSV and any ranks' parts) of this evaluation's cases; this rank keeps
        its share of them as its own rows."""
        rows: dict[str, dict] = {}
        for f in [self.path, *self.parts()]:
            rows.update({r["case"]: r for r in read_case_csv(f) if r.get("case") in self.order})
        self.rows = {c: r for c, r in rows.items() if self.world == 1 or self.order[c] % self.world == self.rank}
        return rows

    def _write(self, rows: Mapping[str, Mapping[str, Any]], path: Path) -> None:
        from mtl_med.metrics.medical import write_case_csv

        write_case_csv(sorted(rows.values(), key=lambda r: self.order[r["case"]]), path)

    def add(self, case: str, result: Mapping[str, Any]) -> None:
        """``run``'s ``on_case``: this rank's part rewritten with the finished case."""
        self.rows[case] = {"case": case, **result["metrics"]}
        self._write(self.rows, self.mine)

    def merge(self, rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Rank 0: the CSV of ``rows`` (the parts removed); its rows as read back (``[]`` when none)."""
        if self.world > 1 or rows:
            self._write(rows, self.path)
            for f in self.parts():
                f.unlink(missing_ok=True)
        return read_case_csv(self.path) if rows else []


def _summarise(rows: list[dict[str, Any]], path: Path, section: str, predictor: Any, res: Mapping[str, Any]) -> None:
    from mtl_med.metrics.medical import write_metrics_summary

    summary = write_metrics_summary(
        rows, path, data_range=predictor.case_metrics.data_range, label_table=predictor.writer.label_table,
        section=section, num_samples=predictor.num_samples,
        inference_mode=predictor.inference_mode, failed=res["failed"], skipped=res["skipped"],
    )
    logger.info("metrics of %d case(s) written to %s", len(rows), path.parent)
    for name in SUMMARY_METRICS:
        if name in summary["metrics"]:
            s = summary["metrics"][name]
            tqdm.write(f"{name}: {s['mean']:.4g} ({s['std']:.3g}) over {s['n']} case(s)")


def _evaluable(datalist: Any, section: str) -> list[dict]:
    items = list_cases(datalist=datalist, section=section)
    missing = [x["name"] for x in items if "ct" not in x and "label" not in x]
    if missing:
        raise InputError(datalist, f'items without "ct" or "label" cannot be evaluated: {missing}')
    return items


def evaluate_cases(
    predictor: VolumePredictor,
    datalist: Any,
    section: str = "test",
    output_dir: str | os.PathLike | None = None,
    metrics_dir: str | os.PathLike | None = None,
    save_outputs: bool = False,
    csv_name: str = "metrics.csv",
    summary_name: str = "metrics_summary.json",
    skip_existing: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Table 2 evaluation over ``datalist[section]`` (items with "ct" and / or "label"; "bone" optional):
    per-case CSV and a summary JSON (mean and standard deviation over cases) in ``metrics_dir``. Metrics are
    computed on the preprocessed grid (A.3: MR, CT and labels resampled to 1.46 mm). Failed cases are reported,
    the others evaluated, then :class:`CaseFailures` is raised.

    The CSV is rewritten (atomically) after every case, so an interrupted run keeps its finished rows; with
    ``skip_existing`` the cases that have a row (and, with ``save_outputs``, their outputs) are not run again.
    The summary is computed from the CSV, earlier rows included. Under ``torch.distributed`` each rank writes
    ``<csv>.rank<r>.csv`` as it goes; rank 0 merges them into the CSV (in datalist order) and writes the summary.
    """
    items = _evaluable(datalist, section)
    skip_existing = as_bool(skip_existing, "skip_existing")
    rank, world = rank_world()
    mdir = Path(metrics_dir if metrics_dir is not None else (output_dir or predictor.output_dir)).expanduser().resolve()
    check_output_dir(mdir)
    table = _CaseCsv(mdir, csv_name, {x["name"]: i for i, x in enumerate(items)}, rank, world)
    earlier = table.earlier() if skip_existing else {}
    if earlier:
        logger.info("%d case(s) have rows in %s already (skip_existing)", len(earlier), table.path)
    barrier(world)  # every rank has read the earlier rows before any rank rewrites a part
    on_case: Callable[[str, Mapping[str, Any]], None] = table.add
    res = predictor.run(datalist=datalist, section=section, output_dir=output_dir, save_outputs=save_outputs,
                        raise_on_failure=False, skip_existing=skip_existing, num_workers=num_workers,
                        done_cases=set(earlier) if skip_existing else None, on_case=on_case)
    if rank != 0:
        return {"rows": [], "failed": res["failed"], "skipped": res["skipped"]}
    merged = dict(earlier)
    merged.update({c: {"case": c, **r["metrics"]} for c, r in res["cases"].items()})
    rows_all = table.merge(merged)  # the summary is the CSV's
    if rows_all:
        _summarise(rows_all, mdir / summary_name, section, predictor, res)
    if res["failed"]:
        raise CaseFailures(res["failed"], len(items))
    return {"rows": rows_all, "failed": res["failed"], "skipped": res["skipped"]}
