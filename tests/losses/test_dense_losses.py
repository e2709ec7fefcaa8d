"""Dense task losses on hand cases, and Table 7's weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtl_med.losses import MultiTaskLoss, dense_losses, dense_task_weights
from mtl_med.losses.dense import MaskedL1Loss, NormalCosineLoss, PixelCrossEntropyLoss


def test_cross_entropy_skips_the_ignore_index():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, -1]]])
    want = (-F.log_softmax(torch.tensor([2.0, 0.0]), 0)[0] - F.log_softmax(torch.tensor([0.0, 1.0]), 0)[1]) / 2
    assert PixelCrossEntropyLoss()(logits, target) == pytest.approx(float(want))
    assert PixelCrossEntropyLoss()(logits, target[:, None]) == pytest.approx(float(want))
    none = PixelCrossEntropyLoss()(logits.requires_grad_(), torch.full((1, 1, 3), -1))
    assert none == 0
    none.backward()  # an all-ignored batch still has a graph


def test_l1_depth_over_valid_pixels_and_the_mask():
    pred = torch.tensor([1.0, 3.0, 10.0]).reshape(1, 1, 1, 3)
    gt = torch.tensor([2.0, 2.0, 0.0]).reshape(1, 1, 1, 3)
    assert MaskedL1Loss()(pred, gt) == pytest.approx(1.0)
    mask = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    assert MaskedL1Loss()(pred, gt, mask) == pytest.approx(1.0)
    assert MaskedL1Loss(positive_only=False)(pred, gt) == pytest.approx((1 + 1 + 10) / 3)


def test_normal_loss_is_one_minus_cosine_of_the_normalised_prediction():
    pred = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 3)
    gt = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    assert NormalCosineLoss()(pred, gt) == pytest.approx((0 + 1 - math.cos(math.pi / 4)) / 2)


def test_table_7_weights_and_the_composed_loss():
    kinds = {"seg": "seg", "normal": "normal", "depth": "depth"}
    w = dense_task_weights("nyu_v2_3task", kinds)
    assert w == {"seg": 1.0, "normal": 20.0, "depth": 3.0}
    assert dense_task_weights("tiny_taskonomy", {"kp": "keypoint", "e": "edge"}) == {"kp": 7.0, "e": 7.0}
    with pytest.raises(ValueError, match="no weight for"):
        dense_task_weights("cityscapes", kinds)
    loss = MultiTaskLoss(dense_losses(kinds), w)
    out = {"seg": torch.zeros(2, 3, 4, 4), "normal": torch.ones(2, 3, 4, 4), "depth": torch.ones(2, 1, 4, 4)}
    tgt = {"seg": torch.zeros(2, 4, 4, dtype=torch.long), "normal": torch.ones(2, 3, 4, 4), "depth": torch.full((2, 1, 4, 4), 2.0)}
    total, terms = loss(out, tgt)
    assert float(total) == pytest.approx(math.log(3) + 20 * 0 + 3 * 1, abs=1e-5)
