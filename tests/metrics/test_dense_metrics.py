"""Dense metrics against cases computed by hand."""

import math

import pytest
import torch

from mtl_med.metrics import DenseMeters, DepthMeter, NormalMeter, SegmentationMeter, dense_delta_m

# pairs (target, prediction) over the valid pixels: (0,0) (0,1) (1,1) | (1,1) (2,1); the -1 pixel is ignored
TARGET = torch.tensor([[[0, 0, 1]], [[1, 2, -1]]])
PRED = torch.tensor([[[0, 1, 1]], [[1, 1, 2]]])


def test_miou_and_pixel_accuracy_over_the_split():
    m = SegmentationMeter(num_classes=4)  # class 3 never occurs: it does not count
    m.update(PRED[:1], TARGET[:1])
    m.update(PRED[1:], TARGET[1:])
    out = m.compute()
    # IoU: class 0 = 1 / (1 + 1), class 1 = 2 / (2 + 2), class 2 = 0 / 1
    assert out["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)


def test_scores_are_argmaxed_and_the_ignore_index_is_respected():
    scores = torch.nn.functional.one_hot(PRED.clamp(0), 4).permute(0, 3, 1, 2).float()
    a, b = SegmentationMeter(4), SegmentationMeter(4, ignore_index=255)
    a.update(scores, TARGET)
    b.update(PRED, torch.where(TARGET < 0, 255, TARGET))
    assert a.compute() == b.compute()


def test_adashare_compat_drops_classes_without_a_hit_and_averages_batches():
    m = SegmentationMeter(num_classes=4, adashare_compat=True)
    m.update(PRED[:1], TARGET[:1])
    m.update(PRED[1:], TARGET[1:])
    out = m.compute()
    assert out["miou"] == pytest.approx(0.5)  # class 2 has no true positive
    assert out["pixel_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_depth_errors_over_valid_pixels():
    pred = torch.tensor([2.5, 2.0, 4.0, 7.0]).reshape(1, 1, 2, 2)
    gt = torch.tensor([2.0, 2.0, 2.0, 0.0]).reshape(1, 1, 2, 2)  # the last pixel is invalid
    m = DepthMeter()
    m.update(pred, gt)
    out = m.compute()
    assert out["abs_err"] == pytest.approx(2.5 / 3)
    assert out["rel_err"] == pytest.approx(1.25 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt(4.25 / 3))
    # ratios 1.25 (not < 1.25), 1, 2 (not < 1.25^3 = 1.95)
    assert (out["delta1"], out["delta2"], out["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_depth_compat_weights_batch_means_by_batch_size():
    m = DepthMeter(adashare_compat=True)
    m.update(torch.tensor([[[[3.0, 2.0]]]]), torch.tensor([[[[2.0, 2.0]]]]))  # mean abs 0.5, one image
    m.update(torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 2.0))  # 0, two images
    assert m.compute()["abs_err"] == pytest.approx(0.5 / 3)


def _unit(deg):
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_normal_angles_mean_median_and_within():
    preds = [_unit(0), _unit(10), [2 * v for v in _unit(20)], _unit(45), [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]
    targets = [[0.0, 0.0, 1.0]] * 5 + [[0.0, 0.0, 0.0]]  # the last target is invalid
    p = torch.tensor(preds).T.reshape(1, 3, 2, 3)
    g = torch.tensor(targets).T.reshape(1, 3, 2, 3)
    m = NormalMeter()
    m.update(p, g)
    out = m.compute()
    assert out["mean_error"] == pytest.approx((0 + 10 + 20 + 45 + 90) / 5)
    assert out["median_error"] == pytest.approx(20, abs=1e-3)
    assert (out["within_11.25"], out["within_22.5"], out["within_30"]) == pytest.approx((2 / 5, 3 / 5, 3 / 5))
    m.update(p[..., :1, :1], g[..., :1, :1])  # one more 0: the median of six values is the mean of the middle two
    assert m.compute()["median_error"] == pytest.approx((10 + 20) / 2, abs=1e-3)
    assert "within_45" in NormalMeter(adashare_compat=True).compute()


def test_dense_meters_and_delta_m():
    meters = DenseMeters({"seg": "seg", "depth": "depth"}, num_classes=4)
    meters.update({"seg": PRED, "depth": torch.ones(2, 1, 1, 3)}, {"seg": TARGET, "depth": torch.ones(2, 1, 1, 3)})
    out = meters.compute()
    assert out["depth"]["abs_err"] == 0 and out["seg"]["pixel_acc"] == pytest.approx(0.6)
    multi = {"seg": {"miou": 0.33}, "depth": {"abs_err": 0.5}}
    single = {"seg": {"miou": 0.30}, "depth": {"abs_err": 0.4}}
    assert dense_delta_m(multi, single) == pytest.approx((0.1 - 0.25) / 2)


def test_dense_delta_m_is_a_mean_over_tasks_not_over_metrics():
    # seg reports two metrics, depth one: each task weighs 1/2, not each metric 1/3
    multi = {"seg": {"miou": 0.33, "pixel_acc": 0.90}, "depth": {"abs_err": 0.5}}
    single = {"seg": {"miou": 0.30, "pixel_acc": 0.90}, "depth": {"abs_err": 0.4}}
    assert dense_delta_m(multi, single) == pytest.approx(((0.1 + 0.0) / 2 - 0.25) / 2)
    with pytest.raises(KeyError, match="depth"):
        dense_delta_m(multi, {"seg": single["seg"]})
