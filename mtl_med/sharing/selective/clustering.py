"""Selective Sharing's grouping (section 3.3, 3.4, A.2): HDBSCAN over the branches' gradient factors under
the four sharing conditions, the surviving branch of each group, the merge and the stop rule."""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ['CONDITIONS', 'pairwise_distances', 'mutual_reachability', 'cluster_branches', 'pick_survivor', 'merge_groups', 'StopRule']

#: the sharing conditions of A.2
CONDITIONS = ("similarity", "dissimilarity", "variance", "random")


# ---- clustering (section 3.3, A.2) -----------------------------------------------------------------
def pairwise_distances(points) -> np.ndarray:
    """Euclidean distances between the rows of ``points``."""
    p = torch.as_tensor(np.asarray(points, dtype=np.float64) if not torch.is_tensor(points) else points).double()
    return torch.cdist(p, p).numpy()


def mutual_reachability(distances: np.ndarray, min_samples: int = 2) -> np.ndarray:
    """Eq. 6: ``max(core_k(a), core_k(b), d(a, b))``, ``core_k`` the distance to the ``k``-th nearest
    point counting the point itself (scikit-learn's ``min_samples`` convention: ``min_samples = 2``
    is the nearest other point). The diagonal is 0."""
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    if n < 2:
        return np.zeros_like(d)
    k = min(int(min_samples), n) - 1
    core = np.sort(d, axis=1)[:, k]
    out = np.maximum(d, np.maximum(core[:, None], core[None, :]))
    np.fill_diagonal(out, 0.0)
    return out


def _hdbscan(x: np.ndarray, metric: str, min_cluster_size: int, min_samples: int, allow_single_cluster: bool) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    kwargs = dict(min_cluster_size=min_cluster_size, min_samples=min_samples, metric=metric, cluster_selection_method="eom",
                  allow_single_cluster=allow_single_cluster)
    if "copy" in inspect.signature(HDBSCAN).parameters:
        kwargs["copy"] = True  # never write into the caller's array
    return HDBSCAN(**kwargs).fit(x).labels_


def _canonical(labels) -> np.ndarray:
    """Groups numbered 0, 1, ... in the order of their first member; -1 stays -1."""
    out, names = np.full(len(labels), -1, dtype=int), {}
    for i, g in enumerate(labels):
        if g >= 0:
            out[i] = names.setdefault(int(g), len(names))
    return out


def _join_within(labels: np.ndarray, reachability: np.ndarray, epsilon: float) -> np.ndarray:
    """HDBSCAN(eps) (Malzer and Baum 2019; scikit-learn's ``cluster_selection_epsilon``): groups, and
    branches left alone, that are linked by a mutual reachability below ``epsilon`` are joined
    (DBSCAN* below ``epsilon``, HDBSCAN above). Written here because scikit-learn's epsilon path
    fails under NumPy 2 (scikit-learn issue #33219)."""
    n = len(labels)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if (labels[i] >= 0 and labels[i] == labels[j]) or reachability[i, j] < epsilon:
                parent[find(i)] = find(j)
    roots = [find(i) for i in range(n)]
    sizes = Counter(roots)
    return _canonical(np.array([r if sizes[r] >= 2 else -1 for r in roots]))


def _sizes(labels: np.ndarray) -> list[int]:
    return sorted(Counter(int(g) for g in labels if g >= 0).values(), reverse=True)


def cluster_branches(
    points,
    condition: str = "similarity",
    seed: int = 0,
    *,
    num_groups: int | None = None,
    min_cluster_size: int = 2,
    min_samples: int = 2,
    allow_single_cluster: bool = False,
) -> np.ndarray:
    """One group label per branch (``-1``: stays alone) from one point per branch (rows of a 2D tensor
    or array), with scikit-learn's HDBSCAN (section 3.3).

    The paper names HDBSCAN and its mutual reachability (eq. 6) but no parameters. A group needs two
    branches, and ten to fifty points need the most permissive density, so
    ``min_cluster_size = 2`` and ``min_samples = 2``: in scikit-learn ``min_samples`` counts the point
    itself, so 2 means the nearest *other* point (the ``hdbscan`` package's ``min_samples = 1``).
    With ``allow_single_cluster=False`` (HDBSCAN's default) all branches never form one group, so two
    branches alone never merge; set it to merge them whenever they are HDBSCAN's only cluster.

    Conditions (A.2; the paper gives their intent only, fig. 12):

    - ``"similarity"`` (the paper's best): HDBSCAN on Euclidean distances.
    - ``"dissimilarity"`` ("maximizes the core distance"): HDBSCAN on the inverted distances
      ``max(D) - D``, so the most distant branches become neighbours.
    - ``"variance"`` ("favors large task clusters"): similarity, then groups and lone branches
      closer (mutual reachability) than the median pairwise distance are joined into larger groups
      (HDBSCAN's ``cluster_selection_epsilon`` at that median).
    - ``"random"`` (the control): a seeded random partition with the group sizes of the similarity
      clustering of the same points (as many groups and singletons), or ``num_groups`` groups of
      near-equal sizes over at least as many branches as similarity groups.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    x = points.detach().cpu().double().numpy() if torch.is_tensor(points) else np.asarray(points, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"points must be 2D (one row per branch), got shape {x.shape}")
    n = x.shape[0]
    if min_cluster_size < 2 or min_samples < 1:
        raise ValueError(f"min_cluster_size must be >= 2 and min_samples >= 1, got {min_cluster_size}, {min_samples}")
    if num_groups is not None and condition != "random":
        raise ValueError("num_groups is for condition 'random' only")
    if n < 2:
        return np.full(n, -1, dtype=int)
    samples = min(int(min_samples), n)
    if condition == "dissimilarity":
        d = pairwise_distances(x)
        inverted = d.max() - d
        np.fill_diagonal(inverted, 0.0)
        return _canonical(_hdbscan(inverted, "precomputed", min_cluster_size, samples, allow_single_cluster))
    labels = _canonical(_hdbscan(x, "euclidean", min_cluster_size, samples, allow_single_cluster))
    if condition == "variance":
        d = pairwise_distances(x)
        return _join_within(labels, mutual_reachability(d, samples), float(np.median(d[np.triu_indices(n, 1)])))
    if condition != "random":
        return labels
    sizes = _sizes(labels)
    if num_groups is not None:
        k = int(num_groups)
        if k < 0 or 2 * k > n:
            raise ValueError(f"num_groups must be between 0 and {n // 2} for {n} branches, got {num_groups}")
        if k != len(sizes):
            grouped = min(n, max(sum(sizes), 2 * k)) if k else 0
            sizes = [grouped // k + (i < grouped % k) for i in range(k)] if k else []
    order = np.random.default_rng(int(seed)).permutation(n)
    out, start = np.full(n, -1, dtype=int), 0
    for g, size in enumerate(sizes):
        out[order[start:start + size]] = g
        start += size
    return _canonical(out)


def pick_survivor(group: Sequence[int], losses: Mapping[int, float] | Sequence[float]) -> int:
    """The branch of ``group`` whose aggregated loss over the epoch is lowest (section 3.4: "keeping the
    branch whose aggregated loss was the lowest in the newly formed group"); ties and missing or
    non-finite losses go to the lowest branch index."""
    group = sorted(int(b) for b in group)
    if not group:
        raise ValueError("pick_survivor needs a non-empty group")

    def loss(b):
        try:
            v = float(losses[b])
        except (KeyError, IndexError, TypeError):
            return math.inf
        return v if math.isfinite(v) else math.inf

    return min(group, key=lambda b: (loss(b), b))


def merge_groups(assignment: Sequence[int], branches: Sequence[int], labels: Sequence[int], losses: Mapping[int, float]) -> tuple[list[int], list[dict]]:
    """The task -> branch map after merging each group of ``labels`` (one label per branch of
    ``branches``) into its survivor (:func:`pick_survivor`), and one ``{"members", "survivor"}``
    record per group. Merges are never undone: a merged branch serves its tasks from then on."""
    new = [int(b) for b in assignment]
    merges = []
    for g in sorted({int(v) for v in labels if v >= 0}):
        members = sorted(int(b) for b, v in zip(branches, labels) if v == g)
        survivor = pick_survivor(members, losses)
        new = [survivor if b in members else b for b in new]
        merges.append({"members": members, "survivor": survivor})
    return new, merges


class StopRule:
    """Section 3.3: stop grouping once every task shares its branch with at least one other task, or
    after ``patience`` consecutive grouping epochs without a change (footnote 2: 3); then the
    architecture is locked."""

    def __init__(self, patience: int = 3):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.unchanged, self.locked = 0, False

    def update(self, changed: bool, assignment: Sequence[int]) -> bool:
        """After one grouping epoch: whether it merged branches, and the task -> branch map. Returns
        whether the architecture is now locked."""
        if self.locked:
            return True
        self.unchanged = 0 if changed else self.unchanged + 1
        counts = Counter(int(b) for b in assignment)
        if all(c >= 2 for c in counts.values()) or self.unchanged >= self.patience:
            self.locked = True
        return self.locked

    def state_dict(self) -> dict:
        return {"patience": self.patience, "unchanged": self.unchanged, "locked": self.locked}

    def load_state_dict(self, state: Mapping) -> None:
        self.unchanged, self.locked = int(state["unchanged"]), bool(state["locked"])

