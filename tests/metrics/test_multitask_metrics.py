"""Per-task metrics, delta-m and the result writers."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from mtl_med.metrics.multitask import (
    binary_classification_metrics,
    binary_predictions,
    delta_m,
    multitask_metrics,
    ranking_metrics,
    regression_metrics,
    summarize_runs,
    write_summary_json,
    write_task_csv,
)


def test_accuracy_precision_recall_on_a_hand_case():
    pred = [1, 1, 0, 0, 1, 0]
    true = [1, 0, 0, 1, 1, 0]
    # TP = 2, FP = 1, FN = 1, TN = 2
    m = binary_classification_metrics(pred, true)
    assert m == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3})
    assert binary_classification_metrics([0, 0], [1, 0])["precision"] == 0.0  # undefined -> 0


def test_binary_predictions_from_logits():
    assert binary_predictions(torch.tensor([[-1.0], [2.0]])).tolist() == [0, 1]
    assert binary_predictions(torch.tensor([[3.0, 1.0], [0.0, 2.0]])).tolist() == [0, 1]
    with pytest.raises(ValueError):
        binary_predictions(np.zeros((2, 3)))


def test_mae_with_age_scale():
    assert regression_metrics(torch.tensor([0.30, 0.50]), torch.tensor([0.25, 0.60]), scale=100)["mae"] == pytest.approx(7.5)


def test_multitask_metrics_dispatch():
    out = {"age": torch.tensor([[0.2], [0.4]]), "gender": torch.tensor([[1.0, -1.0], [-1.0, 1.0]])}
    tgt = {"age": torch.tensor([0.3, 0.4]), "gender": torch.tensor([0, 0])}
    m = multitask_metrics(out, tgt, {"age": "regression", "gender": "binary"}, {"age": 100})
    assert m["age"]["mae"] == pytest.approx(5.0) and m["gender"]["accuracy"] == 0.5


def test_delta_m_on_a_hand_case_with_a_lower_is_better_metric():
    multi = {"gender/accuracy": 0.9, "age/mae": 6.0}
    single = {"gender/accuracy": 0.8, "age/mae": 8.0}
    # (+(0.9 - 0.8)/0.8 - (6 - 8)/8) / 2 = (0.125 + 0.25) / 2
    assert delta_m(multi, single) == pytest.approx(0.1875)
    assert delta_m(multi, single, {"age/mae"}) == pytest.approx(0.1875)
    # declaring nothing lower-is-better flips the sign of the MAE term
    assert delta_m(multi, single, lower_is_better=[]) == pytest.approx((0.125 - 0.25) / 2)
    with pytest.raises(KeyError):
        delta_m({"x": 1.0}, {"y": 1.0})


def test_writers(tmp_path):
    runs = {
        "seed0": {"age": {"mae": 6.0}, "gender": {"accuracy": 0.9}},
        "seed1": {"age": {"mae": 8.0}, "gender": {"accuracy": 0.8}},
    }
    write_task_csv(tmp_path / "tasks.csv", runs)
    rows = list(csv.DictReader(open(tmp_path / "tasks.csv")))
    assert len(rows) == 4 and rows[0] == {"run": "seed0", "task": "age", "metric": "mae", "value": "6.0"}
    s = summarize_runs(runs)
    assert s["age"]["mae"] == {"mean": 7.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    summary = write_summary_json(tmp_path / "summary.json", runs, baseline={"age/mae": 8.0, "gender/accuracy": 0.8})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["num_runs"] == 2 and on_disk["tasks"]["gender"]["accuracy"]["mean"] == pytest.approx(0.85)
    # of the mean: ((0.85-0.8)/0.8 - (7-8)/8)/2; per run: 0.1875 and 0.0
    assert summary["delta_m"]["of_mean"] == pytest.approx((0.0625 + 0.125) / 2)
    assert summary["delta_m"]["mean"] == pytest.approx(0.09375)
    # atomic_write leaves its temporary as ".<name>.<random>.tmp<suffix>" (hidden): nothing but the two files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "tasks.csv"]


def test_kendall_tau_on_a_hand_case():
    # one discordant pair of six: tau = (5 - 1) / 6
    assert ranking_metrics(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]))["kendall_tau"] == pytest.approx(2 / 3)
    assert ranking_metrics([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["kendall_tau"] == 0.0  # constant scores: undefined -> 0
    m = multitask_metrics({"r": torch.tensor([[3.0], [2.0], [1.0]])}, {"r": torch.tensor([0.0, 1.0, 2.0])}, {"r": "ranking"})
    assert m["r"]["kendall_tau"] == pytest.approx(-1.0)
