"""Trees of a branched multi-task network and their search under a parameter budget (Vandenhende et al.,
"Branched Multi-Task Networks", section 3.2 and Algorithm 1).

A tree is written as a bmtas ``branch_config`` (Bruggemann et al., BMVC 2020): ``num_blocks x num_tasks``
integer labels, row ``l`` giving each task's branch at block ``l``. Equivalently a chain of partitions of
the tasks, each refining the one before; a branch at block ``l`` owns its own copy of that block. A later
row may not re-merge tasks that an earlier row split: as in bmtas, rows are intersected with the rows above.

Section 3.2 scores a tree by ``C_cluster = sum_l C_l``, ``C_l`` the average over the clusters of block ``l``
of each cluster's largest pairwise task dissimilarity ``1 - A``; a tree's size is its parameter count.
:func:`search_exhaustive` enumerates every tree; :func:`search_beam` is the paper's beam search for many
tasks. Both return a :class:`TreeSearchResult`; :func:`save_tree_json` / :func:`load_tree_json` keep the
chosen tree as ``tree.json``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mtl_med.io import atomic_write_text

__all__ = [
    "canonical_tree",
    "tree_partitions",
    "tree_mappings",
    "tree_num_branches",
    "enumerate_trees",
    "tree_cost",
    "tree_params",
    "TreeScore",
    "TreeSearchResult",
    "search_exhaustive",
    "search_beam",
    "budget_from_fraction",
    "save_tree_json",
    "load_tree_json",
]

Config = list[list[int]]


class TreeScore(NamedTuple):
    """One tree of a search: its canonical config, cost ``C_cluster`` and parameter count."""

    config: Config
    cost: float
    params: float


@dataclass
class TreeSearchResult:
    """The best tree within ``budget`` and ``table``, every tree the search scored (for a Pareto plot).
    Fields read as attributes or as keys (``result["config"]``, ``result.get("table")``)."""

    config: Config
    cost: float
    params: float
    budget: float
    table: list[TreeScore]

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.__dataclass_fields__ else default


# ----------------------------------------------------------------------------------------------- tree format
def _labels(config) -> np.ndarray:
    try:
        arr = np.asarray(config)
    except ValueError as e:  # ragged rows
        raise ValueError(f"config must be a (num_blocks x num_tasks) table of integer labels: {e}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"config must be a non-empty (num_blocks x num_tasks) table, got shape {arr.shape}")
    numeric = arr.dtype != bool and np.issubdtype(arr.dtype, np.number)
    if not numeric or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(f"config labels must be integers, got {arr.tolist()}")
    return arr.astype(np.int64)


def canonical_tree(config) -> Config:
    """The tree ``config`` defines: every row refined by the rows above (two tasks stay apart once split)
    and branches numbered by first appearance over the tasks, so one tree has one config."""
    labels = _labels(config)
    rows, parent = [], [0] * labels.shape[1]
    for row in labels:
        ids: dict[tuple[int, int], int] = {}
        parent = [ids.setdefault((p, int(x)), len(ids)) for p, x in zip(parent, row)]
        rows.append(parent)
    return rows


def _groups(labels: Sequence[int]) -> list[tuple[int, ...]]:
    groups: dict[int, list[int]] = {}
    for t, b in enumerate(labels):
        groups.setdefault(b, []).append(t)
    return [tuple(g) for g in groups.values()]


def tree_partitions(config) -> list[list[tuple[int, ...]]]:
    """Per block, the tasks of each branch (branch ``b`` = item ``b``)."""
    return [_groups(row) for row in canonical_tree(config)]


def tree_mappings(config) -> list[dict[int, list[int]]]:
    """Per block, ``{parent_branch: [child_branches]}`` (bmtas' mapping); block 0's parent is the root ``0``.
    Branches are numbered as in :func:`canonical_tree`, which is bmtas' numbering for a canonical config."""
    rows = canonical_tree(config)
    mappings = []
    for parents, row in zip([[0] * len(rows[0])] + rows[:-1], rows):
        mapping: dict[int, list[int]] = {}
        for p, b in zip(parents, row):
            children = mapping.setdefault(p, [])
            if b not in children:
                children.append(b)
        mappings.append(mapping)
    return mappings


def tree_num_branches(config) -> list[int]:
    """Per block, the number of branches (copies of the block)."""
    return [max(row) + 1 for row in canonical_tree(config)]


# ---------------------------------------------------------------------------------------------- enumeration
@functools.cache
def _set_partitions(n: int) -> list[tuple[int, ...]]:
    """Every partition of ``n`` items as a restricted growth string (labels by first appearance)."""
    out = [()]
    for _ in range(n):
        out = [s + (b,) for s in out for b in range(max(s, default=-1) + 2)]
    return out


def _refinements(labels: tuple[int, ...], memo: dict) -> list[tuple[int, ...]]:
    if labels not in memo:
        groups, result = _groups(labels), []
        for parts in itertools.product(*(_set_partitions(len(g)) for g in groups)):
            key = [0] * len(labels)
            for k, (g, part) in enumerate(zip(groups, parts)):
                for t, b in zip(g, part):
                    key[t] = (k, b)
            ids: dict = {}
            result.append(tuple(ids.setdefault(x, len(ids)) for x in key))
        memo[labels] = result
    return memo[labels]


def _check_first_shared(first_shared: int, num_blocks: int) -> None:
    if not 0 <= first_shared <= num_blocks:
        raise ValueError(f"first_shared must lie in [0, {num_blocks}] (the number of blocks), got {first_shared}")


def enumerate_trees(num_tasks: int, num_blocks: int, first_shared: int = 1) -> list[Config]:
    """Every tree over ``num_blocks`` blocks whose first ``first_shared`` blocks are shared by all tasks,
    as canonical configs. Section 3.2 roots the tree at a shared first layer ``f_0``: the trees with ``k``
    branchable blocks after it are ``enumerate_trees(n, k + 1)`` (= ``enumerate_trees(n, k, first_shared=0)``)."""
    if num_tasks < 1 or num_blocks < 1:
        raise ValueError(f"need at least one task and one block, got {num_tasks} tasks and {num_blocks} blocks")
    _check_first_shared(first_shared, num_blocks)
    memo: dict = {}
    trees: list[Config] = []

    def grow(rows: list[tuple[int, ...]], last: tuple[int, ...]) -> None:
        if len(rows) == num_blocks:
            trees.append([list(r) for r in rows])
            return
        for labels in _refinements(last, memo):
            grow(rows + [labels], labels)

    shared = (0,) * num_tasks
    grow([shared] * first_shared, shared)
    return trees


# ------------------------------------------------------------------------------------------ cost and size
def _dissimilarity(dissimilarity, num_blocks: int | None = None, num_tasks: int | None = None) -> np.ndarray:
    d = np.asarray(dissimilarity, dtype=float)
    if d.ndim != 3 or d.shape[1] != d.shape[2] or not np.all(np.isfinite(d)):
        raise ValueError(f"dissimilarity must be a finite (num_blocks x N x N) array, got shape {d.shape}")
    if num_blocks is not None and d.shape[:2] != (num_blocks, num_tasks):
        raise ValueError(f"dissimilarity has shape {d.shape} but the tree has {num_blocks} blocks and {num_tasks} tasks")
    return d


def _block_cost(d: np.ndarray, labels: Sequence[int]) -> float:
    # Section 3.2 averages "the maximum distance ... of the elements in every cluster" and is silent on the
    # weighting and on singletons; we take the unweighted mean over clusters, a singleton counting as 0.
    groups = _groups(labels)
    worst = [d[np.ix_(g, g)][~np.eye(len(g), dtype=bool)].max() if len(g) > 1 else 0.0 for g in groups]
    return float(sum(worst) / len(groups))


def tree_cost(config, dissimilarity) -> float:
    """``C_cluster`` of section 3.2: the sum over blocks of the mean, over the block's branches, of the largest
    dissimilarity between two tasks of the branch. ``dissimilarity[l]`` (``1 - A``) scores block ``l``'s
    grouping: section 3.2 measures affinity at the locations where the tree may branch and is silent on the
    pairing; we use the affinity measured at the output of block ``l`` for block ``l``."""
    rows = canonical_tree(config)
    d = _dissimilarity(dissimilarity, len(rows), len(rows[0]))
    return float(sum(_block_cost(d[l], row) for l, row in enumerate(rows)))


def _block_params(block_params, num_blocks: int | None = None) -> np.ndarray:
    p = np.asarray(block_params, dtype=float)
    if p.ndim != 1 or (num_blocks is not None and len(p) != num_blocks) or np.any(p < 0):
        raise ValueError(f"block_params must be one non-negative count per block ({num_blocks}), got {list(p)}")
    return p


def _num(x: float) -> float:
    return int(x) if float(x).is_integer() else float(x)


def tree_params(config, block_params, fixed_params: float = 0) -> float:
    """Parameters of the tree: ``fixed_params`` (stem, decoders) plus, per block, branches x ``block_params[l]``."""
    counts = tree_num_branches(config)
    return _num(fixed_params + float(np.dot(counts, _block_params(block_params, len(counts)))))


def budget_from_fraction(fraction: float, block_params, num_tasks: int, fixed_params: float = 0, first_shared: int = 1) -> float:
    """The parameter count ``fraction`` of the way from hard sharing (0, every block shared) to single-task
    networks (1, one copy of each block after the first ``first_shared`` per task)."""
    p = _block_params(block_params)
    _check_first_shared(first_shared, len(p))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    hard = fixed_params + p.sum()
    single = fixed_params + p[:first_shared].sum() + num_tasks * p[first_shared:].sum()
    return _num(hard + fraction * (single - hard))


# --------------------------------------------------------------------------------------------------- search
def _prepare(dissimilarity, block_params, budget, fixed_params, first_shared):
    d = _dissimilarity(dissimilarity)
    p = _block_params(block_params, d.shape[0])
    _check_first_shared(first_shared, d.shape[0])
    smallest = _num(fixed_params + p.sum())
    if budget < smallest:
        raise ValueError(f"no tree fits a budget of {budget} parameters: the smallest tree (every block shared) has {smallest}")
    return d, p


def _best(table: list[TreeScore], budget: float) -> TreeScore:
    # Section 3.2 selects the tree of minimal cost within the budget; equal costs go to the smaller tree.
    return min((s for s in table if s.params <= budget), key=lambda s: (round(s.cost, 12), s.params))


def search_exhaustive(
    dissimilarity, block_params, budget: float, fixed_params: float = 0, first_shared: int = 1
) -> TreeSearchResult:
    """Score every tree whose first ``first_shared`` blocks are shared (:func:`enumerate_trees`) and return the
    one of least cost with at most ``budget`` parameters (Algorithm 1; equal costs go to fewer parameters);
    ``table`` holds every tree, over budget or not. ``dissimilarity``: ``(num_blocks, N, N)``, ``1 - A``."""
    d, p = _prepare(dissimilarity, block_params, budget, fixed_params, first_shared)
    memo: dict = {}

    def cost(l: int, labels: tuple[int, ...]) -> float:
        if (l, labels) not in memo:
            memo[l, labels] = _block_cost(d[l], labels)
        return memo[l, labels]

    table = []
    for config in enumerate_trees(d.shape[1], d.shape[0], first_shared):
        c = sum(cost(l, tuple(row)) for l, row in enumerate(config))
        table.append(TreeScore(config, c, tree_params(config, p, fixed_params)))
    best = _best(table, budget)
    return TreeSearchResult(best.config, best.cost, best.params, budget, table)


def _coarsenings(child: tuple[int, ...], affinity: np.ndarray, max_groups: int, seed: int) -> list[tuple[int, ...]]:
    """Groupings of the branches of ``child`` (super-nodes) into ``m = 1 .. max_groups`` groups by spectral
    clustering of their mean member affinity."""
    from sklearn.cluster import SpectralClustering

    groups = _groups(child)
    # Section 3.2 is silent on the spectral affinity; A lies in [-1, 1], and we cluster (1 + A) / 2, which keeps
    # its order and is non-negative (the diagonal does not enter the Laplacian); cluster_qr is deterministic.
    s = np.array([[affinity[np.ix_(g, h)].mean() for h in groups] for g in groups]) if max_groups > 2 else None
    out = []
    for m in range(1, max_groups + 1):
        if m == 1 or m == len(groups):
            super_labels = np.zeros(len(groups), int) if m == 1 else np.arange(len(groups))
        else:
            sc = SpectralClustering(m, affinity="precomputed", assign_labels="cluster_qr", random_state=seed)
            super_labels = sc.fit_predict((1.0 + s) / 2.0)
        ids: dict[int, int] = {}
        out.append(tuple(ids.setdefault(int(super_labels[k]), len(ids)) for k in child))
    return out


def search_beam(
    dissimilarity, block_params, budget: float, fixed_params: float = 0, first_shared: int = 1,
    beam_width: int = 10, seed: int = 0,
) -> TreeSearchResult:
    """Section 3.2's beam search for many tasks: from the deepest block towards the input, spectral-cluster the
    branches of the block below into ``m = 1 .. b_{l+1}`` groups (the deepest block clusters the tasks), keep
    the ``beam_width`` partial trees of least cost and drop those that no longer fit ``budget``. ``table``
    holds the complete trees of the last step. A heuristic: with one grouping proposed per ``m`` it can miss
    the optimum of :func:`search_exhaustive`, even for three tasks."""
    # Section 3.2 says "top-down, starting at the most outer layer" with m <= b_{l+1}; the bound only holds
    # when the grouping at block l coarsens the one at l + 1, so we go from the output towards the input,
    # treat the branches of block l + 1 as super-nodes (affinity between two: mean over their members), and
    # call "eligible" a partial tree that can still be completed within the budget by sharing the blocks
    # above it.
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    d, p = _prepare(dissimilarity, block_params, budget, fixed_params, first_shared)
    num_blocks, num_tasks = d.shape[:2]
    beam: list[tuple[tuple[tuple[int, ...], ...], float, float]] = [((), 0.0, 0.0)]
    for l in reversed(range(num_blocks)):
        candidates: dict = {}
        for rows, cost, params in beam:
            child = rows[0] if rows else tuple(range(num_tasks))
            max_groups = 1 if l < first_shared else max(child) + 1
            for labels in _coarsenings(child, 1.0 - d[l], max_groups, seed):
                new_params = params + (max(labels) + 1) * p[l]
                key = (labels,) + rows
                if key not in candidates and fixed_params + p[:l].sum() + new_params <= budget:
                    candidates[key] = (cost + _block_cost(d[l], labels), new_params)
        ranked = sorted(candidates.items(), key=lambda kv: (round(kv[1][0], 12), kv[1][1]))
        beam = [(rows, c, n) for rows, (c, n) in ranked[:beam_width]]
    table = [TreeScore([list(r) for r in rows], c, _num(fixed_params + n)) for rows, (c, n) in ranked]
    best = _best(table, budget)
    return TreeSearchResult(best.config, best.cost, best.params, budget, table)


# ------------------------------------------------------------------------------------------------ tree.json
def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _check_names(names, count: int, what: str, where: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}{what} must be {count} strings (one per {what[:-6]}), got {names!r}")
    return list(names)


def save_tree_json(
    path: str | os.PathLike, config, task_names: Sequence[str], block_names: Sequence[str] | None = None, **extra
) -> dict:
    """Write ``tree.json``: ``task_names``, ``block_names`` (default ``block_0 ...``), the canonical ``config``
    and any ``extra`` entries (``cost``, ``params``, ``budget``, ...), atomically; returns the record."""
    config = canonical_tree(config)
    num_blocks, num_tasks = len(config), len(config[0])
    record = {
        "task_names": _check_names(task_names, num_tasks, "task_names", ""),
        "block_names": _check_names(block_names or [f"block_{l}" for l in range(num_blocks)], num_blocks, "block_names", ""),
        "config": config,
        **extra,
    }
    text = json.dumps(record, indent=2, default=_json_default)
    text = re.sub(r"\[([-+0-9.eE,\s]+)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)  # a row per line
    atomic_write_text(text + "\n", path)
    return record


def load_tree_json(path: str | os.PathLike) -> dict:
    """Read a ``tree.json`` of :func:`save_tree_json` or a bmtas ``branch_config.json`` (``{"config": ...}``;
    its ``task_names`` and ``block_names`` come back as None). ``config`` comes back canonical."""
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or "config" not in record:
        raise ValueError(f"{path}: not a tree file (expected an object with a 'config' entry)")
    try:
        record["config"] = canonical_tree(record["config"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    shape = {"task_names": len(record["config"][0]), "block_names": len(record["config"])}
    for key, count in shape.items():
        if record.get(key) is not None:
            record[key] = _check_names(record[key], count, key, f"{path}: ")
        record.setdefault(key, None)
    return record
