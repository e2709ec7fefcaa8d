"""Task losses that honour a mask of valid voxels.

Appendix A.3 of the SFG paper pads 128x128 training patches to 136x136 and computes the loss
only inside the non-padded region; every loss here takes that mask (``B1H[WD]``, 1 inside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn

__all__ = ["MaskedRMSELoss", "MaskedDiceCELoss", "MaskedCrossEntropyLoss"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class MaskedRMSELoss(nn.Module):
    """Root mean squared error over the masked voxels (A.2/A.3: RMSE for regression tasks)."""

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # in float32 at least: under bf16 autocast the prediction is bf16, and casting the target down to it would
        # round CT to 8-16 HU steps before the error is taken
        dtype = torch.promote_types(input.dtype, torch.float32)
        input, target = input.to(dtype), target.to(dtype).reshape(input.shape)
        return (_masked_mean((input - target) ** 2, mask) + self.eps).sqrt()


class MaskedCrossEntropyLoss(nn.Module):
    """Cross-entropy of logits ``BCH[WD]`` (or ``BC``) against integer labels ``B1H[WD]`` (or ``B``)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = target.long()
        if target.ndim == input.ndim:
            target = target[:, 0]
        ce = F.cross_entropy(input, target, reduction="none").unsqueeze(1)
        return _masked_mean(ce, mask)


class MaskedDiceCELoss(nn.Module):
    """Dice + cross-entropy (A.3, after Isensee et al.) over the masked voxels.

    Dice uses MONAI's ``MaskedDiceLoss`` (softmax applied before masking); cross-entropy is
    averaged over the mask only.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = True):
        super().__init__()
        self.dice = MaskedDiceLoss(include_background=include_background, to_onehot_y=True, softmax=True)
        self.ce = MaskedCrossEntropyLoss()
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if target.ndim == input.ndim - 1:
            target = target.unsqueeze(1)
        if mask is None:
            mask = torch.ones_like(target, dtype=input.dtype)
        dice = self.dice(input, target, mask=mask)
        return self.lambda_dice * dice + self.lambda_ce * self.ce(input, target, mask)
