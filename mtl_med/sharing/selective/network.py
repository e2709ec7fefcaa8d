"""Selective Sharing (Strezoski, van Noord and Worring, ICMR 2019): task groups learned while training.

The network (section 3, A.1): the backbone's trunk extracts features, one hard-shared fully
connected layer follows, then identical, identically initialised task-specific branches (FC layers),
then one output layer per task. At the end of each epoch the branches whose first-FC weight
gradients look alike are grouped (sections 3.1-3.3) and each group keeps one branch (3.4): its tasks
then differ only in their output layers. Grouping stops once every task shares a branch or nothing
changed for three epochs (3.3); the architecture is then locked and training continues.

This module holds the method and its pieces:

- :class:`SelectiveSharing`, the sharing method (``build_network(..., "selective")``). The branches'
  weights are one batched tensor per layer, ``(branches, out, in)``, indexed by the persistent buffer
  ``branch_of_task``: a merge rewrites that map only, so state-dict keys, the optimiser's state and
  DDP's parameter list stay valid.
- :func:`tt_svd` and :func:`tt_reconstruct`: the tensor-train decomposition (eq. 4-5), written in
  torch, with fixed ranks and sign-fixed cores so that branches can be compared.
- :func:`tensorize_shape`, :class:`FactorAccumulator`: a branch's gradient as a 4-way tensor, its TT
  factors per mini-batch, stacked over the epoch and normalised (one clustering point per branch).
- :func:`cluster_branches` (HDBSCAN, the four sharing conditions of A.2), :func:`pick_survivor`,
  :func:`merge_groups` and :class:`StopRule`.

The training side (gradient capture, clustering, merging, records) is
:class:`mtl_med.sharing.selective.handler.SelectiveSharingHandler`, which :meth:`SelectiveSharing.train_handlers`
returns.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Pool
from torch import nn

from mtl_med.networks.blocks import Backbone, Trunk
from mtl_med.networks.heads import DenseHeads, PooledHeads

from ..base import MultiTaskNetwork

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
    "selective_mnist",
]

#: the sharing conditions of A.2
CONDITIONS = ("similarity", "dissimilarity", "variance", "random")


# ---- tensor train (section 3.2, eq. 4-5) -----------------------------------------------------------
def tt_full_ranks(shape: Sequence[int]) -> list[int]:
    """The TT ranks that represent any tensor of ``shape`` exactly: ``r_k = min(n_1..n_k, n_k+1..n_d)``."""
    shape = [int(n) for n in shape]
    return [1] + [min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))] + [1]


def _tt_ranks(ranks, shape: Sequence[int]) -> list[int]:
    d = len(shape)
    if ranks is None:
        return tt_full_ranks(shape)
    if isinstance(ranks, int):
        ranks = [1] + [int(ranks)] * (d - 1) + [1]
    ranks = [int(r) for r in ranks]
    if len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
        raise ValueError(f"TT ranks must be an int or {d + 1} positive values starting and ending with 1, got {ranks}")
    return ranks


def _tt_svd_batched(tensor: torch.Tensor, ranks=None, sign_fix: bool = True) -> list[torch.Tensor]:
    """TT-SVD of each ``tensor[a]`` at once: cores ``(A, r_{k-1}, n_k, r_k)``. A rank larger than the
    unfolding allows is padded with zero slices, so cores always have the requested shape."""
    batch, shape = tensor.shape[0], tuple(tensor.shape[1:])
    if len(shape) < 1:
        raise ValueError("tt_svd needs a tensor with at least one mode")
    ranks = _tt_ranks(ranks, shape)
    rest = tensor.reshape(batch, 1, -1)  # what is still to be decomposed, (A, r_{k-1}, n_k * ... * n_d)
    cores = []
    for k, n in enumerate(shape[:-1]):
        r_prev, r = ranks[k], ranks[k + 1]
        u, s, vh = torch.linalg.svd(rest.reshape(batch, r_prev * n, -1), full_matrices=False)
        keep = min(r, s.shape[-1])
        u, s, vh = u[..., :keep], s[..., :keep], vh[..., :keep, :]
        if sign_fix:
            # scikit-learn's svd_flip convention: the largest-magnitude entry of each left singular
            # vector is positive; the sign moves into S V^T, so the product is unchanged. Without it
            # LAPACK's arbitrary signs would make two branches' factors incomparable (section 3.2
            # compares factors; the gauge is otherwise free).
            pick = torch.gather(u, -2, u.abs().argmax(-2, keepdim=True))
            signs = torch.where(pick < 0, -1.0, 1.0).to(u.dtype)
            u, vh = u * signs, vh * signs.transpose(-1, -2)
        rest = s[..., None] * vh
        if keep < r:  # rank-deficient unfolding: zero slices keep the shapes fixed and the product exact
            u = F.pad(u, (0, r - keep))
            rest = F.pad(rest, (0, 0, 0, r - keep))
        cores.append(u.reshape(batch, r_prev, n, r))
    cores.append(rest.reshape(batch, ranks[-2], shape[-1], 1))
    return cores


def tt_svd(tensor: torch.Tensor, ranks: int | Sequence[int] | None = None, sign_fix: bool = True) -> list[torch.Tensor]:
    """Tensor-train decomposition by sequential truncated SVDs (Oseledets 2011; the paper's eq. 4).

    Args:
        tensor: a ``d``-way tensor ``(n_1, ..., n_d)``.
        ranks: ``None`` (full ranks: exact), an ``int`` (every inner rank) or ``d + 1`` ranks
            ``(1, r_1, ..., r_{d-1}, 1)``. Fixed ranks give cores of fixed shapes (padded with zeros
            where a tensor has a lower rank), so the factors of every branch have the same length.
        sign_fix: make each core's left singular vectors' largest-magnitude entry positive, so that
            the cores are unique (for distinct singular values) and comparable between tensors.

    Returns:
        The cores, core ``k`` of shape ``(r_{k-1}, n_k, r_k)``; cores ``1..d-1`` are left-orthonormal.
    """
    return [c[0] for c in _tt_svd_batched(tensor[None], ranks, sign_fix)]


def tt_reconstruct(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor of TT ``cores`` (eq. 4): ``(n_1, ..., n_d)``, or ``(r_0, n_1, ..., n_d, r_d)`` when
    the boundary ranks are not 1."""
    if not cores:
        raise ValueError("tt_reconstruct needs at least one core")
    r0, shape = cores[0].shape[0], [c.shape[1] for c in cores]
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        if core.shape[0] != out.shape[-1]:
            raise ValueError(f"TT cores do not chain: rank {out.shape[-1]} then {core.shape[0]}")
        out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    rd = cores[-1].shape[-1]
    out = out.reshape(r0, *shape, rd)
    return out.reshape(shape) if r0 == rd == 1 else out


def _balanced_pair(n: int) -> tuple[int, int]:
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def tensorize_shape(rows: int, cols: int) -> tuple[int, int, int, int]:
    """A ``rows x cols`` weight gradient as 4 modes ``(o1, o2, i1, i2)``, ``o1 o2 = rows``,
    ``i1 i2 = cols``, each pair as balanced as the divisors allow (100 x 640 -> 10, 10, 20, 32).

    Section 3.2 decomposes a gradient "tensor ... with d elements" by TT; a 2-way TT would be a plain
    truncated SVD, so the matrix is reshaped into 4 modes (the paper does not say how)."""
    return (*_balanced_pair(int(rows)), *_balanced_pair(int(cols)))


def factor_vectors(grads: torch.Tensor, rank: int = 4, shape: Sequence[int] | None = None) -> torch.Tensor:
    """One row per gradient: the flattened, sign-fixed TT cores of ``grads[a]`` (``(A, rows, cols)``,
    tensorised by :func:`tensorize_shape` unless ``shape`` is given) at fixed inner rank ``rank``,
    scaled to unit length (``(A, L)``; a zero gradient stays zero).

    Fixed ranks: every branch's row has the same length (the paper stacks them, eq. 5; it gives no
    ranks). Normalised (section 3.2 says "normalized" only): the first cores are left-orthonormal,
    so the gradient's scale sits in the last core alone, which is scaled to unit norm before the
    row is; then the shrinking gradient scale over training and the tasks' different loss scales
    do not decide the grouping, the gradient's direction does."""
    a = grads.shape[0]
    shape = tensorize_shape(*grads.shape[1:]) if shape is None else tuple(shape)
    cores = _tt_svd_batched(grads.detach().float().reshape(a, *shape), rank)
    last = cores[-1].reshape(a, -1)
    rows = torch.cat([*(c.reshape(a, -1) for c in cores[:-1]), last / last.norm(dim=1, keepdim=True).clamp_min(1e-12)], 1)
    rows = rows * (last.norm(dim=1, keepdim=True) > 0)  # no gradient (no task of the branch in the batch): no factors
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


class FactorAccumulator:
    """The per-branch matrices ``C_b`` of eq. 5 over one epoch: one row of TT factors per mini-batch
    (:func:`factor_vectors`), stacked in batch order.

    Every branch gets a row at every mini-batch, so rows are aligned across branches (all branches see
    the same batches). :meth:`points` gives one clustering point per branch: its ``C_b`` flattened
    and scaled to unit length ("the resulting group tensor a clustering candidate ... named after
    the index of the task specific estimator", section 3.1).
    """

    def __init__(self, rank: int = 4):
        self.rank = int(rank)
        self.reset()

    def reset(self) -> None:
        self.branches: list[int] | None = None
        self.rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, branches: Sequence[int], grads: torch.Tensor) -> None:
        """The gradients ``(A, rows, cols)`` of the ``A`` branches ``branches`` at one mini-batch."""
        branches = [int(b) for b in branches]
        if self.branches is None:
            self.branches = branches
        elif branches != self.branches:
            raise ValueError(f"the active branches changed within an epoch: {self.branches} then {branches}")
        self.rows.append(factor_vectors(grads, self.rank))

    def points(self) -> tuple[list[int], torch.Tensor]:
        """``(branches, points)``: one unit-length row per branch, ``(A, num_batches * L)``, on the CPU."""
        if not self.rows:
            return [], torch.zeros(0, 0)
        stacked = torch.stack(self.rows, 1).reshape(len(self.branches), -1).cpu().double()
        return list(self.branches), stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)


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


# ---- the sharing method ----------------------------------------------------------------------------
def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A fully connected layer on ``(B, C)`` features, or at every position of ``(B, C, *spatial)``."""
    return F.linear(x, w, b) if x.ndim == 2 else F.linear(x.movedim(1, -1), w, b).movedim(-1, 1)


class SelectiveSharing(MultiTaskNetwork):
    """Trunk -> one hard-shared FC layer -> per task an identical branch of FC layers -> its output layer.

    All branches start identical (section 3: "identical task specific estimators with identical
    layers and weights"; slot 0 initialised as ``nn.Linear`` and copied). Branch ``b``'s layer ``l``
    is ``branch_weights[l][b]``; task ``t`` runs branch ``branch_of_task[t]`` (a persistent buffer,
    initially task ``t`` -> branch ``t``). Merging rewrites the buffer: the unused slots stay in the
    state dict and receive exactly zero gradient.

    Features: on a backbone whose output is pooled (ResNet, VGG, the MNIST CNN), adaptive average
    pooling to ``pooled_size`` per spatial side, flattened: 1 is global average pooling; the paper's
    MNIST network flattens the 40 x 4 x 4 map of a 28 x 28 digit (``pooled_size=4``, an identity
    pooling there). On a dense backbone (HighResNet) with dense heads, or with upsampling dense heads
    (``head="aspp"`` / ``"fcn"`` on ResNet, the dense bundle), the FC layers act at every position of
    the feature map (FC = 1x1 convolution); this carries the method to per-pixel tasks, which the
    paper (image-level tasks only) does not cover.

    The output layers replace the heads that ``build_network`` made: the same outputs per task
    (linear; the paper's one sigmoid per binary task is the bundle's two logits with cross-entropy),
    on the last branch width. Upsampling heads are rebuilt as the same kind on the last branch width
    (each branch ends in its task's ASPP / FCN head, upsampled to the input: the heads every other
    method of the dense bundle has, so the comparison changes only the sharing).

    Args:
        shared_width: units of the hard-shared FC layer (MNIST 640, CIFAR-10 1024, CUB and OmniArt
            2048, OmniGlot 300; section 4.2).
        branch_widths: units of each branch's FC layers (MNIST 100, 50; CIFAR-10 100, 100; CUB 512,
            256; OmniArt 300, 300).
        pooled_size: pooled positions per spatial side before the shared layer (pooled backbones).
        dropout: dropout after each branch layer (OmniGlot and OmniArt: 0.2; MNIST none).
        condition: the sharing condition (A.2): similarity, dissimilarity, variance or random.
        tt_rank: inner TT rank of the gradient factors (not given in the paper: 4).
        start_epoch: the first epoch at whose end branches are clustered (A.2: from the first
            epochs, "after the model starts learning").
        patience: epochs without a change that lock the architecture (footnote 2: 3).
        min_cluster_size, min_samples, allow_single_cluster: HDBSCAN's (scikit-learn's convention,
            see :func:`cluster_branches`).
        seed: seed of the random condition (advanced by the epoch).
        bn_inference: as every method.
    """

    name = "selective"

    def __init__(
        self,
        backbone: Backbone,
        task_names,
        heads,
        shared_width: int = 640,
        branch_widths: Sequence[int] = (100, 50),
        pooled_size: int = 1,
        dropout: float = 0.0,
        condition: str = "similarity",
        tt_rank: int = 4,
        start_epoch: int = 1,
        patience: int = 3,
        min_cluster_size: int = 2,
        min_samples: int = 2,
        allow_single_cluster: bool = False,
        seed: int = 0,
        bn_inference: str = "population",
    ):
        from mtl_med.networks.dense_heads import UpsampledHeads

        super().__init__(backbone, task_names, heads, bn_inference)
        widths = [int(w) for w in branch_widths]
        if int(shared_width) < 1 or not widths or min(widths) < 1:
            raise ValueError(f"shared_width and branch_widths must be positive with at least one branch layer, got {shared_width}, {branch_widths}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if int(pooled_size) < 1 or not 0.0 <= float(dropout) < 1.0 or int(tt_rank) < 1 or int(start_epoch) < 1:
            raise ValueError(f"need pooled_size >= 1, 0 <= dropout < 1, tt_rank >= 1, start_epoch >= 1; got {pooled_size}, {dropout}, {tt_rank}, {start_epoch}")
        StopRule(patience)  # validates
        self.settings = dict(condition=condition, tt_rank=int(tt_rank), start_epoch=int(start_epoch), patience=int(patience),
                             min_cluster_size=int(min_cluster_size), min_samples=int(min_samples),
                             allow_single_cluster=bool(allow_single_cluster), seed=int(seed))
        upsampled = isinstance(heads, UpsampledHeads)
        self.dense = upsampled or isinstance(heads, DenseHeads)
        self.trunk = Trunk(backbone)
        if self.dense:
            self.pool, features = None, backbone.out_channels
        else:
            self.pool = Pool[Pool.ADAPTIVEAVG, backbone.spatial_dims](int(pooled_size))
            features = backbone.out_channels * int(pooled_size) ** backbone.spatial_dims
        self.shared = nn.Linear(features, int(shared_width))
        self.dropout = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        t = self.num_tasks
        self.branch_weights, self.branch_biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip([int(shared_width), *widths[:-1]], widths):
            first = nn.Linear(fan_in, fan_out)  # identical initial branches: one draw, copied
            self.branch_weights.append(nn.Parameter(first.weight.detach()[None].repeat(t, 1, 1)))
            self.branch_biases.append(nn.Parameter(first.bias.detach()[None].repeat(t, 1)))
        if upsampled:  # the same kind of dense heads (ASPP / FCN), on the last branch width
            self.heads = heads.rebuilt(widths[-1])
        else:
            outs = heads.out_channels if isinstance(heads, PooledHeads) else [int(m.out_channels) for m in heads]
            self.heads = DenseHeads(backbone.spatial_dims, widths[-1], outs) if self.dense else PooledHeads(backbone.spatial_dims, widths[-1], outs)
        self.register_buffer("branch_of_task", torch.arange(t, dtype=torch.long))
        self.register_buffer("locked", torch.zeros((), dtype=torch.long))

    # --- the map of tasks to branches ------------------------------------------------------------
    def assignment(self) -> list[int]:
        """``branch_of_task`` as a list: the branch of each task."""
        return [int(b) for b in self.branch_of_task.tolist()]

    def active_branches(self) -> list[int]:
        """The branches some task uses, in order."""
        return sorted(set(self.assignment()))

    def groups(self) -> list[list[str]]:
        """The tasks of each active branch (task names), in branch order."""
        a = self.assignment()
        return [[n for n, b in zip(self.task_names, a) if b == branch] for branch in self.active_branches()]

    def set_assignment(self, branch_of_task: Sequence[int]) -> None:
        """Point each task at a branch (a merge); the buffer is rewritten in place."""
        new = torch.as_tensor([int(b) for b in branch_of_task], dtype=torch.long)
        if new.shape != self.branch_of_task.shape or bool((new < 0).any()) or bool((new >= self.num_tasks).any()):
            raise ValueError(f"branch_of_task needs one branch in [0, {self.num_tasks}) per task, got {list(branch_of_task)}")
        self.branch_of_task.copy_(new)

    def merge(self, members: Sequence[int], survivor: int) -> None:
        """The tasks of branches ``members`` move to branch ``survivor`` (one of them)."""
        members = {int(b) for b in members}
        if int(survivor) not in members:
            raise ValueError(f"the survivor {survivor} must be one of the merged branches {sorted(members)}")
        self.set_assignment([int(survivor) if b in members else b for b in self.assignment()])

    @property
    def is_locked(self) -> bool:
        return bool(self.locked.item())

    def lock(self) -> None:
        """The architecture is final (the stop rule fired); kept in the state dict."""
        self.locked.fill_(1)

    # --- sizes -------------------------------------------------------------------------------------
    def branch_parameter_count(self) -> int:
        """Parameters of one branch."""
        return sum(p[0].numel() for p in [*self.branch_weights, *self.branch_biases])

    def active_parameter_count(self) -> int:
        """Parameters in use: everything less the branches no task uses any more."""
        unused = self.num_tasks - len(self.active_branches())
        return sum(p.numel() for p in self.parameters()) - unused * self.branch_parameter_count()

    # --- gradients ---------------------------------------------------------------------------------
    def branch_weight_grads(self) -> tuple[list[int], torch.Tensor | None]:
        """``(branches, grads)``: the weight gradient of the first FC layer of each active branch,
        ``(A, branch_widths[0], shared_width)`` (eq. 1-2: the weights between the hard-shared layer
        and the task-specific layer, bias excluded), or ``None`` before any backward pass."""
        branches = self.active_branches()
        g = self.branch_weights[0].grad
        return branches, None if g is None else g[branches]

    # --- forward -----------------------------------------------------------------------------------
    def shared_features(self, x: torch.Tensor) -> torch.Tensor:
        """The hard-shared representation: trunk, pooling (pooled backbones), shared FC, ReLU."""
        y = self.trunk(x)
        if self.pool is not None:
            y = torch.flatten(self.pool(y), 1)
        return F.relu(_linear(y, self.shared.weight, self.shared.bias))

    def branch(self, y: torch.Tensor, b: int) -> torch.Tensor:
        """Branch ``b`` on the shared representation (ReLU after every layer: "all nonterminal FC units
        use the ReLU", section 4.2; the output layer is the head)."""
        for w, bias in zip(self.branch_weights, self.branch_biases):
            y = self.dropout(F.relu(_linear(y, w[b], bias[b])))
        return y

    def task_features(self, x, task, generator=None):
        shared = self.shared_features(x)
        a = self.assignment()
        if isinstance(task, int):
            return self.branch(shared, a[task])
        out = {b: self.branch(shared, b) for b in sorted(set(a))}  # each active branch runs once
        feats = [out[b] for b in a]
        return feats if task is None else self.rows_of(feats, task)

    # --- training ----------------------------------------------------------------------------------
    def train_handlers(self, summary_writer=None, network: nn.Module | None = None, record_file=None, images: bool = True, **settings) -> list:
        """The handler that captures the branch gradients, clusters and merges at epoch ends, and writes
        ``record_file`` (JSON, one record per epoch) and TensorBoard views (:class:`~mtl_med.sharing.selective.handler.SelectiveSharingHandler`);
        ``settings`` override this network's (condition, tt_rank, ...); ``network`` is the trained
        module when it wraps this one (DDP)."""
        from .handler import SelectiveSharingHandler

        return [SelectiveSharingHandler(self if network is None else network, summary_writer=summary_writer, record_file=record_file, images=images, **settings)]


def selective_mnist(task_names: Sequence[str] = tuple(f"digit_{k}" for k in range(10)), out_channels=2, in_channels: int = 1, **kwargs) -> SelectiveSharing:
    """The paper's MNIST network (section 4.2, fig. 7): two 5x5 convolutions of 20 and 40 channels with
    batch-norm and max pooling; the 40 x 4 x 4 = 640 features of a 28 x 28 digit, flattened, into
    the hard-shared FC layer of 640 units ("as a feature cutoff point, we apply a 640 unit fully
    connected layer"; the PyTorch MNIST example it cites flattens into its first FC layer); per task
    a branch FC 100 -> FC 50 and the output layer. Ten one-vs-all tasks by default."""
    from mtl_med.build import build_network

    kwargs = {"shared_width": 640, "branch_widths": (100, 50), "pooled_size": 4, **kwargs}
    return build_network("mnist_cnn", "selective", list(task_names), out_channels, spatial_dims=2, in_channels=in_channels, **kwargs)
