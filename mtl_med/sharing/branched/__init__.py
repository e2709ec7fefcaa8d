"""Branched multi-task networks (Vandenhende et al., 2019): task affinity from single-task networks
(RSA, section 3.1), the tree of least dissimilarity under a parameter budget (section 3.2), and the
branched network of a tree on any backbone with branch points.

- :mod:`.trees`: trees as bmtas ``branch_config`` matrices, their cost and parameters, exhaustive and
  beam search, ``tree.json``.
- :mod:`.affinity`: features at the branchable blocks, RDMs, the affinity tensor, figures.
- :mod:`.network`: :class:`Branched`, the sharing method.
- :mod:`.search`: :class:`BranchedSearch`, the bundle stage that trains the single-task networks and
  runs the search.
"""

from .trees import (
    TreeScore,
    TreeSearchResult,
    budget_from_fraction,
    canonical_tree,
    enumerate_trees,
    load_tree_json,
    save_tree_json,
    search_beam,
    search_exhaustive,
    tree_cost,
    tree_mappings,
    tree_num_branches,
    tree_params,
    tree_partitions,
)
from .affinity import (
    AffinityResult,
    affinity_figure,
    affinity_image,
    affinity_tensor,
    collect_features,
    load_affinity,
    network_rdms,
    pareto_figure,
    pareto_image,
    rdm,
    rdm_similarity,
    save_affinity,
    task_affinity,
    tree_figure,
    tree_image,
)
from .network import Branched
from .search import BranchedSearch, held_out_slices
