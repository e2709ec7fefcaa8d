"""Selective Sharing (Strezoski, van Noord and Worring, ICMR 2019): everything only about it.

- :mod:`.network`: :class:`SelectiveSharing`, the sharing method (``build_network(..., "selective")``),
  the TT-SVD of the branch gradients and their clustering;
- :mod:`.handler`: :class:`SelectiveSharingHandler`, the training side (gradient capture, clustering,
  merging, records).
"""

from .network import *  # noqa: F401,F403
from .network import __all__ as _network_all
from .handler import SelectiveSharingHandler, clusters_image, membership_image

__all__ = [*_network_all, "SelectiveSharingHandler", "membership_image", "clusters_image"]
