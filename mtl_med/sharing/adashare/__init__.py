"""AdaShare (Sun et al., NeurIPS 2020): everything only about AdaShare.

- :mod:`.gate`: :class:`BlockPolicy`, the per-task select-or-skip logits and their Gumbel-Softmax gates;
- :mod:`.losses`: the policy losses (eq. 5-7) and Table 7's hyper-parameters;
- :mod:`.network`: :class:`AdaShare`, the sharing method (``build_network(..., "adashare")``), and the
  pieces of its training strategy (curriculum, optimisers, data split, policy sampling, export, figure);
- :mod:`.search`: :class:`AdaShareSearch`, the warm-up and policy-learning phases on the caller's
  engines, and :class:`PolicyImageHandler`.
"""

from .network import *  # noqa: F401,F403
from .network import __all__ as _network_all
from .gate import BlockPolicy
from .losses import ADASHARE_HPARAMS, AdaShareRegularizer, adashare_sharing_loss, adashare_sparsity_loss, policy_loss_scales
from .search import AdaShareSearch, PolicyImageHandler

__all__ = [*_network_all, "AdaShareSearch", "PolicyImageHandler", "BlockPolicy", "ADASHARE_HPARAMS", "AdaShareRegularizer",
           "adashare_sharing_loss", "adashare_sparsity_loss", "policy_loss_scales"]
