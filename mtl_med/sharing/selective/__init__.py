"""Selective Sharing (Strezoski, van Noord and Worring, ICMR 2019): everything only about it.

- :mod:`.network`: :class:`SelectiveSharing`, the sharing method (``build_network(..., "selective")``);
- :mod:`.ttsvd`: the TT-SVD of the branch gradients (section 3.2);
- :mod:`.clustering`: HDBSCAN over them, the merge and the stop rule (section 3.3-3.4, A.2);
- :mod:`.handler`: :class:`SelectiveSharingHandler`, the training side (gradient capture, clustering,
  merging, records).
"""

from .clustering import CONDITIONS, StopRule, cluster_branches, merge_groups, mutual_reachability, pairwise_distances, pick_survivor
from .handler import SelectiveSharingHandler, clusters_image, membership_image
from .network import SelectiveSharing
from .ttsvd import FactorAccumulator, factor_vectors, tensorize_shape, tt_full_ranks, tt_reconstruct, tt_svd

__all__ = [
    "SelectiveSharing",
    "CONDITIONS",
    "tt_svd",
    "tt_reconstruct",
    "tt_full_ranks",
    "tensorize_shape",
    "factor_vectors",
    "FactorAccumulator",
    "pairwise_distances",
    "mutual_reachability",
    "cluster_branches",
    "pick_survivor",
    "merge_groups",
    "StopRule",
    "SelectiveSharingHandler",
    "membership_image",
    "clusters_image",
]
