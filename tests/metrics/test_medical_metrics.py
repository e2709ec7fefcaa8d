"""Table 2 metrics (region PSNR, MAE, Dice) on hand-made volumes with known answers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from mtl_med.pelvis import DICE_ORGANS, LABEL_TABLE, PSNR_DATA_RANGE_HU, TABLE2_METRICS
from mtl_med.metrics.medical import (
    dice_per_label,
    case_metrics,
    psnr,
    region_mae,
    region_psnr,
    summarize_cases,
    write_case_csv,
    write_metrics_summary,
)


def test_data_range_is_the_ct_range():
    assert PSNR_DATA_RANGE_HU == 2500 - (-1024)


def test_region_psnr_known_values():
    target = np.full((10, 10, 4), -1024.0)
    pred = target.copy()
    mask = np.zeros(target.shape, bool)
    mask[2:4, 2:4, 1] = True  # 4 voxels
    pred[mask] += 100.0  # error of 100 HU inside the region only
    expected_region = 20 * math.log10(3524 / 100)
    assert region_psnr(pred, target, mask, data_range=PSNR_DATA_RANGE_HU) == pytest.approx(expected_region, abs=1e-9)
    # whole volume (MONAI's PSNRMetric): MSE = 4 * 100^2 / 400
    expected_whole = 10 * math.log10(3524**2 / (4 * 100**2 / 400))
    assert psnr(pred, target, PSNR_DATA_RANGE_HU) == pytest.approx(expected_whole, abs=1e-6)
    assert region_psnr(pred, target, data_range=PSNR_DATA_RANGE_HU) == pytest.approx(expected_whole, abs=1e-6)
    # errors outside the region do not count
    pred2 = pred.copy()
    pred2[0, 0, 0] += 500
    assert region_psnr(pred2, target, mask, data_range=PSNR_DATA_RANGE_HU) == pytest.approx(expected_region, abs=1e-9)
    assert math.isnan(region_psnr(pred, target, np.zeros_like(mask), data_range=PSNR_DATA_RANGE_HU))
    assert region_psnr(target, target, mask, data_range=PSNR_DATA_RANGE_HU) == math.inf
    assert region_mae(pred, target, mask) == pytest.approx(100.0)
    assert region_mae(pred, target) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        region_psnr(pred, target[:-1], mask, data_range=PSNR_DATA_RANGE_HU)


def test_dice_known_values():
    pred = torch.zeros(8, 8, 8, dtype=torch.long)
    target = torch.zeros_like(pred)
    target[0:4, 0:4, 0:4] = 3  # prostate, 64 voxels
    pred[0:4, 0:4, 0:2] = 3  # 32 voxels, all inside
    target[5:7, 5:7, 5:7] = 4  # bladder, 8 voxels, not predicted
    pred[5:6, 0:1, 0:1] = 1  # left femoral head predicted, absent from the truth
    d = dice_per_label(pred, target, DICE_ORGANS)
    assert d["prostate"] == pytest.approx(2 * 32 / (64 + 32))
    assert d["bladder"] == 0.0
    assert math.isnan(d["left_femoral_head"])  # not in the ground truth: left out
    assert math.isnan(d["rectum"])
    row = case_metrics(seg=pred, label=target, **TABLE2_METRICS)
    assert row["dice_mean"] == pytest.approx((2 * 32 / 96 + 0.0) / 2)


def test_pelvis_metrics_regions_and_bone_threshold():
    ct = np.full((6, 6, 3), -1024.0)
    ct[1:3, 1:3, :] = 800.0  # bone by threshold
    label = np.zeros(ct.shape, np.int64)
    label[4, 4, :] = 4  # bladder
    sct = ct.copy()
    sct[1:3, 1:3, :] += 50.0
    row = case_metrics(sct, ct, label, label, **TABLE2_METRICS)
    assert row["psnr_bones"] == pytest.approx(20 * math.log10(3524 / 50))
    assert row["psnr_bladder"] == math.inf and row["psnr_organs"] == math.inf
    assert math.isnan(row["psnr_prostate"])
    assert row["mae_bones"] == pytest.approx(50.0)
    assert row["dice_bladder"] == 1.0
    # an explicit bone mask replaces the threshold
    bone = np.zeros(ct.shape, bool)
    bone[4, 4, :] = True
    assert case_metrics(sct, ct, bone=bone, **TABLE2_METRICS)["psnr_bones"] == math.inf


def test_summary_and_files(tmp_path):
    rows = [{"case": "a", "psnr_overall": 20.0, "dice_mean": 0.5}, {"case": "b", "psnr_overall": 30.0, "dice_mean": math.nan}]
    s = summarize_cases(rows)
    assert s["psnr_overall"] == {"mean": 25.0, "std": 5.0, "n": 2}
    assert s["dice_mean"]["n"] == 1 and s["dice_mean"]["mean"] == 0.5
    write_case_csv(rows, tmp_path / "m.csv")
    with open(tmp_path / "m.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["case"] for r in read] == ["a", "b"] and float(read[1]["psnr_overall"]) == 30.0
    write_metrics_summary(rows, tmp_path / "m.json", data_range=PSNR_DATA_RANGE_HU, label_table=LABEL_TABLE)
    obj = json.loads((tmp_path / "m.json").read_text())  # strict JSON: NaN became null
    assert obj["num_cases"] == 2 and obj["metrics"]["psnr_overall"]["std"] == 5.0
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_uncertainty_quality_tells_informative_from_uninformative_uncertainty():
    from mtl_med.metrics.medical import uncertainty_quality

    rng = np.random.default_rng(0)
    std = rng.uniform(1, 100, 5000)
    err = std * rng.uniform(0.5, 1.5, 5000)  # error grows with the std
    unc = rng.uniform(0, 1, 5000)
    wrong = unc > 0.8  # exactly the most uncertain labels are wrong
    good = uncertainty_quality(std, err, unc, wrong)
    assert good["std_error_spearman"] > 0.8 and good["label_error_auc"] == 1.0
    dec = good["error_by_std_decile"]
    assert len(dec) == 10 and all(a < b for a, b in zip(dec, dec[1:]))  # error rises decile by decile
    noise = uncertainty_quality(std, rng.permutation(err), unc, rng.permutation(wrong))
    assert abs(noise["std_error_spearman"]) < 0.1 and abs(noise["label_error_auc"] - 0.5) < 0.05
    masked = uncertainty_quality(std, err, unc, wrong, mask=std > 50)
    assert masked["voxels"] == int((std > 50).sum())
    assert np.isnan(uncertainty_quality(std, err, unc, np.zeros(5000, bool))["label_error_auc"])
