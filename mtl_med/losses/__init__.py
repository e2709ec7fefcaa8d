"""Multi-task loss composition, masked task losses and sharing regularisers."""

from .masked import MaskedCrossEntropyLoss, MaskedDiceCELoss, MaskedRMSELoss
from .multitask import MultiTaskLoss
