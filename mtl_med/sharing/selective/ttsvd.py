"""Selective Sharing's gradient representation (section 3.2, eq. 4-5): the tensor-train decomposition
written in torch, with fixed ranks and sign-fixed cores so that branches can be compared, and a branch's
first-FC gradient as TT factors per mini-batch, stacked over the epoch (:class:`FactorAccumulator`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ['tt_svd', 'tt_reconstruct', 'tt_full_ranks', 'tensorize_shape', 'factor_vectors', 'FactorAccumulator']


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

