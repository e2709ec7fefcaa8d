"""Multi-task loss composition, masked task losses and sharing regularisers."""

from .masked import MaskedCrossEntropyLoss, MaskedDiceCELoss, MaskedRMSELoss
from .multitask import MultiTaskLoss
from .dense import DENSE_TASK_WEIGHTS, MaskedL1Loss, NormalCosineLoss, PixelCrossEntropyLoss, dense_losses, dense_task_weights
