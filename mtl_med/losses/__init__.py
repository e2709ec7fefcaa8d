"""Multi-task loss composition, masked task losses and sharing regularisers."""

from .masked import MaskedCrossEntropyLoss, MaskedDiceCELoss, MaskedRMSELoss
from .multitask import MultiTaskLoss
from .adashare import ADASHARE_HPARAMS, AdaShareRegularizer, adashare_sharing_loss, adashare_sparsity_loss
