import pytest
import torch

from mtl_med.losses import MaskedDiceCELoss, MaskedRMSELoss, MultiTaskLoss


def _padded_mask():
    mask = torch.zeros(2, 1, 12, 12)
    mask[..., 2:10, 2:10] = 1  # A.3: the loss only sees the non-padded region
    return mask


@pytest.mark.parametrize("loss,channels", [(MaskedRMSELoss(), 1), (MaskedDiceCELoss(), 4)])
def test_masked_losses_ignore_the_padding(loss, channels):
    mask = _padded_mask()
    pred = torch.randn(2, channels, 12, 12, requires_grad=True)
    target = torch.randn(2, 1, 12, 12) if channels == 1 else torch.randint(0, channels, (2, 1, 12, 12))
    value = loss(pred, target, mask)
    value.backward()
    assert pred.grad[..., :2, :].abs().max() == 0 and pred.grad[..., 2:10, 2:10].abs().sum() > 0
    noisy = target.clone()
    noisy[..., :2, :] = noisy[..., :2, :] * 0 + (1 if channels > 1 else 99.0)
    assert loss(pred, noisy, mask).item() == pytest.approx(value.item(), rel=1e-6)


def test_rmse_value():
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([3.0, 4.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    assert MaskedRMSELoss()(pred, target).item() == pytest.approx((25 / 4) ** 0.5)


def test_multitask_loss_weights_regularizer_and_missing_tasks():
    class Net(torch.nn.Module):
        def regularizer(self):
            return torch.tensor(0.5)

    loss = MultiTaskLoss({"a": MaskedRMSELoss(), "b": torch.nn.functional.l1_loss}, weights={"b": 2.0})
    out = {"a": torch.zeros(1, 1, 2, 2), "b": torch.zeros(1, 1, 2, 2)}
    tgt = {"a": torch.ones(1, 1, 2, 2), "b": torch.ones(1, 1, 2, 2)}
    total, terms = loss(out, tgt, model=Net())
    assert total.item() == pytest.approx(1.0 + 2.0 + 0.5)
    assert set(terms) == {"a", "b", "regularizer"}
    total, terms = loss({"a": out["a"]}, tgt)  # one task per mini-batch
    assert total.item() == pytest.approx(1.0) and set(terms) == {"a"}
    with pytest.raises(ValueError):
        MultiTaskLoss({"a": MaskedRMSELoss()}, weights={"c": 1.0})


def test_rmse_of_a_bf16_prediction_is_taken_in_float32():
    """Under bf16 autocast the sCT prediction is bf16; its error against the float32 CT target must not round the
    target to bf16 (8-16 HU steps at network scale CT / 1024 + 1)."""
    target = torch.tensor([[[[1.0 + 1000.0 / 1024, 1.0 + 1500.0 / 1024]]]])
    pred = torch.tensor([[[[1.0 + 1000.0 / 1024, 1.0 + 1500.0 / 1024]]]]).to(torch.bfloat16)
    loss = MaskedRMSELoss()(pred, target)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, MaskedRMSELoss()(pred.float(), target), rtol=0, atol=1e-7)
    assert float(loss) > 0.0  # the prediction's own bf16 rounding is an error the loss sees
