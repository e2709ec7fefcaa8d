"""AdaShare (Sun et al., NeurIPS 2020): everything only about AdaShare.

- :mod:`.network`: :class:`AdaShare`, the sharing method (``build_network(..., "adashare")``), and the
  pieces of its training strategy (curriculum, optimisers, data split, policy sampling, export, figure);
- :mod:`.search`: :class:`AdaShareSearch`, the warm-up and policy-learning phases on the caller's
  engines, and :class:`PolicyImageHandler`.
"""

from .network import *  # noqa: F401,F403
from .network import __all__ as _network_all
from .search import AdaShareSearch, PolicyImageHandler

__all__ = [*_network_all, "AdaShareSearch", "PolicyImageHandler"]
