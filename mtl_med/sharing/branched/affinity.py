"""Task affinity by representation similarity analysis (Branched Multi-Task Networks, section 3.1).

For every task a single-task network (same backbone, same recipe) is run on the same ``K`` held-out
images. At each of ``D`` locations of the sharable encoder the features of every pair of images are
compared, ``RDM[d, i, j] = 1 - pearson(f_d(i), f_d(j))`` (:func:`rdm`), which gives a ``(D, K, K)``
tensor per task (:func:`network_rdms`). Two tasks' RDMs at a location are compared with Spearman's
rank correlation of their upper triangles (:func:`rdm_similarity`); over all pairs of tasks and
locations this is the affinity tensor ``A`` ``(D, N, N)`` (:func:`affinity_tensor`), and
``1 - A`` the task dissimilarity that the tree search minimises (section 3.2).
:func:`task_affinity` runs the whole stage.

Locations. The paper measures affinity "at D locations in the sharable encoder", with the
granularity of the blocks that may branch (section 3.2). Here a location is the output of a
branchable block: for a :class:`~mtl_med.networks.blocks.Trunk` ``t``, the output of unit
``t.branch_points[d + 1]`` (the end of segment ``d + 1`` of ``t.segments()``), location ``d`` is
called ``"block{d + 1}"`` and measures row ``d`` of a branched network's tree. The stem's output
(``branch_points[0]``) is not a location: the stem is always shared, there is nothing to decide.

Choices where the paper is silent (documented at the functions):

* features: the block's output after its final activation, the whole ``C x H x W`` map flattened
  (as Dwivedi & Roig's RSA code); ``pool_to`` adaptive-average-pools it first, a memory option;
* ``center_features``: subtract each feature's mean over the K images before the correlation
  (Dwivedi & Roig's code; default) or not (plain Pearson between images);
* K: ``min(num_images, number of images)``, default 500 (Dwivedi & Roig), a seeded subset, the same
  images in the same order for every task;
* Spearman on the strict upper triangle (``K (K - 1) / 2`` values), ties by average ranks.

Memory: features are held for one network at a time (float32, on the CPU), each location's freed
as soon as its RDM is computed; only the ``(D, K, K)`` RDMs of every task are kept.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from mtl_med.io import atomic_write
from mtl_med.networks.blocks import Trunk

from .trees import tree_partitions

__all__ = [
    "AffinityResult",
    "trunk_of",
    "feature_locations",
    "location_names",
    "select_images",
    "collect_features",
    "rdm",
    "network_rdms",
    "rdm_similarity",
    "affinity_tensor",
    "task_affinity",
    "save_affinity",
    "load_affinity",
    "affinity_figure",
    "affinity_image",
    "pareto_figure",
    "pareto_image",
    "tree_figure",
    "tree_image",
]

#: elements (K x chunk) converted to float64 at a time while computing an RDM
_RDM_CHUNK_ELEMENTS = 1 << 24


# --- where the features come from ------------------------------------------------------------------
def trunk_of(net: nn.Module) -> Trunk:
    """The trunk whose branchable blocks are the locations: a bare :class:`Trunk`, the ``trunk`` of
    a hard-sharing network trained on one task (one head, or other heads whose losses weighed 0, as
    the bundles train them), or the single column of a one-task ``single_task`` network."""
    if isinstance(net, Trunk):
        return net
    trunk = getattr(net, "trunk", None)
    if isinstance(trunk, Trunk) and getattr(net, "name", "hard_sharing") == "hard_sharing":
        return trunk
    columns = getattr(net, "columns", None)
    if isinstance(columns, nn.ModuleList) and len(columns) == 1 and isinstance(columns[0], Trunk):
        return columns[0]
    raise TypeError(
        f"{type(net).__name__} has no plain trunk to read features from; pass a Trunk or a one-task network built by "
        "build_network(backbone, 'hard_sharing', [task], ...)"
    )


def feature_locations(net: nn.Module) -> list[int]:
    """Unit indices (of :func:`trunk_of` ``(net)``) whose outputs are the locations:
    ``branch_points[1:]``, the ends of the branchable blocks (the stem's output is not one)."""
    points = list(trunk_of(net).branch_points)
    if len(points) < 2:
        raise ValueError(f"the trunk has branch points {points}: no branchable block after the stem")
    return points[1:]


def location_names(net: nn.Module) -> list[str]:
    """``"block1" .. "blockD"``: location ``d`` is the output of branchable block ``d + 1``."""
    return [f"block{d + 1}" for d in range(len(feature_locations(net)))]


def select_images(num_available: int, num_images: int = 500, seed: int = 0) -> torch.Tensor:
    """The held-out subset: ``K = min(num_images, num_available)`` indices drawn without replacement
    with ``seed``, in increasing order (the same images in the same order for every task)."""
    if num_available < 1 or num_images < 1:
        raise ValueError(f"need at least one image, got {num_available} available and num_images={num_images}")
    k = min(int(num_images), int(num_available))
    return torch.randperm(int(num_available), generator=torch.Generator().manual_seed(int(seed)))[:k].sort().values


def _plain(x) -> torch.Tensor:
    """A tensor (MONAI's MetaTensor stripped of its metadata) from a tensor or an array."""
    x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    return x.as_subclass(torch.Tensor)


def _image_of(item, image_key: str):
    if isinstance(item, Mapping):
        return item[image_key]
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def _gather_images(images, indices: torch.Tensor | None, image_key: str) -> torch.Tensor:
    """The images as one ``(K, C, ...)`` CPU tensor (``indices`` of them; all for ``None``)."""
    if isinstance(images, torch.utils.data.DataLoader):
        images = images.dataset
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = _plain(images)
        return x if indices is None else x[indices.to(x.device)]
    if hasattr(images, "__len__") and hasattr(images, "__getitem__"):
        idx = range(len(images)) if indices is None else indices.tolist()
        return torch.stack([_plain(_image_of(images[int(i)], image_key)).cpu() for i in idx])
    x = torch.cat([_plain(_image_of(b, image_key)).cpu() for b in images])  # an iterable of batches
    return x if indices is None else x[indices]


def _batches(images, batch_size: int, image_key: str) -> Iterable[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = _plain(images)
        return (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size))
    return (_plain(_image_of(b, image_key)) for b in images)


def _pool(x: torch.Tensor, pool_to) -> torch.Tensor:
    if pool_to is None:
        return x
    dims = x.dim() - 2
    size = (int(pool_to),) * dims if isinstance(pool_to, int) else tuple(int(s) for s in pool_to)
    if len(size) != dims:
        raise ValueError(f"pool_to {pool_to} does not match a {dims}D feature map")
    size = tuple(min(s, n) for s, n in zip(size, x.shape[2:]))  # never enlarge a smaller map
    if size == tuple(x.shape[2:]):
        return x
    return (F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool3d if dims == 3 else F.adaptive_avg_pool1d)(x, size)


class _evaluating:
    """Eval mode (every module) and ``no_grad``; each module's training flag restored afterwards."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag
        return False


def _device_of(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _location_outputs(net: nn.Module, images, batch_size: int, image_key: str, device) -> Iterable[list[torch.Tensor]]:
    """For each batch: the outputs at the locations, on the network's device."""
    trunk = trunk_of(net)
    segments = trunk.segments()
    p = next(trunk.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    method = net if net is not trunk else None
    for xb in _batches(images, batch_size, image_key):
        x = xb.to(device=device, dtype=dtype)
        outs = []
        with contextlib.ExitStack() as stack:
            if method is not None and hasattr(method, "in_context"):
                stack.enter_context(method.in_context(task=0))  # the one task (Task Routing's masks read it)
            if method is not None and hasattr(method, "batch_statistics"):
                stack.enter_context(method.batch_statistics())  # the network's test-time batch-norm choice
            for d, (start, stop) in enumerate(segments):
                x = trunk.run(x, start, stop)
                if d >= 1:  # segment 0 is the stem
                    outs.append(x)
        yield outs


def collect_features(
    net: nn.Module,
    images,
    pool_to: int | Sequence[int] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    image_key: str = "image",
) -> list[torch.Tensor]:
    """The features of ``images`` at every location of ``net`` (:func:`feature_locations`): one
    ``(K, M_d)`` float32 CPU tensor per location, the block's output map flattened per image.

    Section 3.1 says "the features at location d" only; the whole map is used, as Dwivedi & Roig's
    RSA code flattens the full activation. ``pool_to`` (an int or one size per spatial dimension)
    first adaptive-average-pools each map to at most that size: a memory option for dense,
    high-resolution maps (``K x C x H x W`` floats per location otherwise), off by default.

    Args:
        net: a :class:`Trunk` or a one-task network (:func:`trunk_of`); run in eval mode under
            ``no_grad``, its modules' training flags restored afterwards. A network's test-time
            batch-norm choice (``bn_inference``) is honoured.
        images: a tensor ``(K, C, ...)`` (run in batches of ``batch_size``) or an iterable of
            batches: tensors, ``(image, ...)`` tuples or dicts with ``image_key``.
        device: where to run (default: the network's device); the network is moved there and back.
    """
    trunk = trunk_of(net)
    home = _device_of(trunk)
    device = home if device is None else torch.device(device)
    chunks: list[list[torch.Tensor]] = [[] for _ in feature_locations(trunk)]
    if device != home:
        net.to(device)
    try:
        with _evaluating(net):
            for outs in _location_outputs(net, images, int(batch_size), image_key, device):
                for d, y in enumerate(outs):
                    chunks[d].append(_pool(y, pool_to).flatten(1).to(device="cpu", dtype=torch.float32))
    finally:
        if device != home:
            net.to(home)
    if not chunks[0]:
        raise ValueError("no images")
    features = []
    for d in range(len(chunks)):
        features.append(torch.cat(chunks[d]))
        chunks[d] = []  # free the batches of this location before the next is concatenated
    return features


# --- RDMs and their comparison ----------------------------------------------------------------------
def rdm(features, center_features: bool = True, device: torch.device | str | None = None):
    """The representation dissimilarity matrix of ``K`` images: ``(K, M)`` features -> ``(K, K)``,
    ``RDM[i, j] = 1 - pearson(f_i, f_j)`` (section 3.1: "the dissimilarity scores 1 - rho between
    feature representations, with rho the Pearson correlation coefficient").

    With ``center_features`` (default) each feature's mean over the K images is subtracted first,
    as in Dwivedi & Roig's RSA code (``activations - mean(axis=0)``); the paper is silent on it.
    Pearson itself then centres and scales each image's vector. Computed in float64, in chunks of
    features (memory ``K x chunk``), on ``device`` (default: the features' device).

    The result is symmetric with a diagonal of exact zeros and does not depend on the order of
    the features. An image whose (centred) features are constant has no Pearson correlation: it is
    given correlation 0 with every other image (dissimilarity 1), with a warning.

    Returns a float64 tensor on the CPU for a tensor input, a numpy array for an array input.
    """
    as_numpy = not isinstance(features, torch.Tensor)
    x = _plain(np.asarray(features) if as_numpy else features)
    if x.dim() != 2:
        raise ValueError(f"features must be (K, M), got shape {tuple(x.shape)}")
    k, m = x.shape
    if k < 1 or m < 1:
        raise ValueError(f"features must be (K, M) with K, M >= 1, got shape {tuple(x.shape)}")
    device = x.device if device is None else torch.device(device)
    step = max(1, _RDM_CHUNK_ELEMENTS // k)
    spans = [(s, min(s + step, m)) for s in range(0, m, step)]
    # pass 1: the per-image mean of the (feature-centred) features
    row_sum = torch.zeros(k, dtype=torch.float64, device=device)
    col_mean = []
    for s, e in spans:
        c = x[:, s:e].to(device=device, dtype=torch.float64)
        if center_features:
            mu = c.mean(0)
            col_mean.append(mu)
            c = c - mu
        row_sum += c.sum(1)
    row_mean = row_sum / m
    # pass 2: the Gram matrix of the centred image vectors
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for n, (s, e) in enumerate(spans):
        c = x[:, s:e].to(device=device, dtype=torch.float64)
        if center_features:
            c = c - col_mean[n]
        c = c - row_mean[:, None]
        gram += c @ c.T
    norm = gram.diagonal().clamp_min(0).sqrt()
    dead = norm <= 1e-12 * max(1.0, float(norm.max()))
    if bool(dead.any()):
        warnings.warn(
            f"{int(dead.sum())} of {k} images have constant features: Pearson correlation undefined, set to 0 (dissimilarity 1)",
            RuntimeWarning,
            stacklevel=2,
        )
    safe = torch.where(dead, torch.ones_like(norm), norm)
    corr = gram / safe[:, None] / safe[None, :]
    corr[dead, :] = 0.0
    corr[:, dead] = 0.0
    out = 1.0 - corr.clamp(-1.0, 1.0)
    out = 0.5 * (out + out.T)
    out.fill_diagonal_(0.0)
    out = out.cpu()
    return out.numpy() if as_numpy else out


def network_rdms(
    net: nn.Module,
    images,
    center_features: bool = True,
    pool_to: int | Sequence[int] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    image_key: str = "image",
) -> torch.Tensor:
    """One task's ``(D, K, K)`` RDMs (float64, CPU): :func:`collect_features` then :func:`rdm` at
    each location, each location's features freed once its RDM is computed."""
    features = collect_features(net, images, pool_to=pool_to, batch_size=batch_size, device=device, image_key=image_key)
    out = []
    for d in range(len(features)):
        out.append(rdm(features[d], center_features=center_features, device=device))
        features[d] = None
    return torch.stack(out)


def rdm_similarity(r1, r2) -> float:
    """Spearman's rank correlation between the strict upper triangles (``K (K - 1) / 2`` entries,
    the diagonal excluded) of two ``(K, K)`` RDMs; ties get average ranks (section 3.1: "the
    upper or lower triangular part", compared with Spearman's correlation coefficient)."""
    a, b = np.asarray(torch.as_tensor(r1).detach().cpu(), dtype=float), np.asarray(torch.as_tensor(r2).detach().cpu(), dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"RDMs must be square and of the same shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 3:
        raise ValueError(f"Spearman's correlation needs K >= 3 images (at least 3 pairs), got K={a.shape[0]}")
    iu = np.triu_indices(a.shape[0], k=1)
    return float(stats.spearmanr(a[iu], b[iu])[0])


def affinity_tensor(rdms: Mapping[str, object] | Sequence[object], task_names: Sequence[str] | None = None) -> np.ndarray:
    """The task affinity tensor ``A`` ``(D, N, N)``: ``A[d, i, j]`` = :func:`rdm_similarity` of
    task ``i``'s and task ``j``'s RDMs at location ``d``; symmetric, diagonal exactly 1. The task
    dissimilarity of section 3.2 is ``1 - A``.

    Args:
        rdms: ``{task: (D, K, K)}`` (tasks in the mapping's order, or ``task_names``'s) or a list
            of ``(D, K, K)`` in task order.
    """
    if isinstance(rdms, Mapping):
        names = list(rdms) if task_names is None else [str(t) for t in task_names]
        mats = [np.asarray(torch.as_tensor(rdms[t]).detach().cpu(), dtype=float) for t in names]
    else:
        mats = [np.asarray(torch.as_tensor(r).detach().cpu(), dtype=float) for r in rdms]
    if not mats:
        raise ValueError("no RDMs")
    shape = mats[0].shape
    if len(shape) != 3 or any(m.shape != shape for m in mats):
        raise ValueError(f"every task's RDMs must be (D, K, K) of one shape, got {[m.shape for m in mats]}")
    d_, n = shape[0], len(mats)
    a = np.ones((d_, n, n))
    for d in range(d_):
        for i in range(n):
            for j in range(i + 1, n):
                a[d, i, j] = a[d, j, i] = rdm_similarity(mats[i][d], mats[j][d])
    return a


# --- the whole stage ---------------------------------------------------------------------------------
@dataclass
class AffinityResult:
    """What :func:`task_affinity` measured (also what :func:`load_affinity` reads back; ``rdms``
    and ``indices`` are then ``None`` / as saved)."""

    affinity: np.ndarray  # (D, N, N)
    task_names: list[str]
    location_names: list[str]
    num_images: int
    seed: int | None
    center_features: bool
    pool_to: tuple[int, ...] | int | None = None
    indices: np.ndarray | None = None  # the held-out images used, in order
    rdms: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # task -> (D, K, K)

    @property
    def dissimilarity(self) -> np.ndarray:
        """``1 - A`` (section 3.2; not the ``1 - rho`` inside the RDMs)."""
        return 1.0 - self.affinity

    def __iter__(self):  # ``A, rdms = task_affinity(...)``
        return iter((self.affinity, self.rdms))

    def save(self, path: str | os.PathLike) -> str:
        return save_affinity(path, self)


def _task_names(networks, task_names) -> tuple[list[str], list[nn.Module]]:
    if isinstance(networks, Mapping):
        names, nets = [str(t) for t in networks], list(networks.values())
    else:
        nets = list(networks)
        if task_names is not None:
            names = [str(t) for t in task_names]
        else:
            own = [getattr(n, "task_names", [None])[0] for n in nets]
            names = own if None not in own and len(set(own)) == len(own) else [f"task{i}" for i in range(len(nets))]
    if len(names) != len(nets) or len(set(names)) != len(names):
        raise ValueError(f"need one unique task name per network, got {names} for {len(nets)} networks")
    return names, nets


def task_affinity(
    networks: Mapping[str, nn.Module] | Sequence[nn.Module],
    images,
    num_images: int = 500,
    seed: int = 0,
    center_features: bool = True,
    pool_to: int | Sequence[int] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    task_names: Sequence[str] | None = None,
    image_key: str = "image",
) -> AffinityResult:
    """Section 3.1 for ``N`` trained single-task networks (one per task, the same backbone): the
    RDMs of every task on ``K = min(num_images, len(images))`` held-out images and the affinity
    tensor ``A`` ``(D, N, N)``.

    The images (:func:`select_images` with ``seed``: the same images, same order, for every task)
    are gathered once on the CPU; the networks then run one at a time, each one's features freed
    once its RDMs are computed (:func:`network_rdms`), so no two tasks' features are ever held.

    Args:
        networks: ``{task: network}`` or a list (names: ``task_names``, else each network's own
            task name when these differ, else ``task0, task1, ...``). Each is a :class:`Trunk` or
            a one-task network (:func:`trunk_of`).
        images: held-out images: a tensor ``(M, C, ...)``, a dataset of tensors, ``(image, ...)``
            tuples or ``{image_key: image}`` dicts, a ``DataLoader`` (its dataset is used) or an
            iterable of batches. They must be deterministic (validation transforms).
        num_images: K at most (500: Dwivedi & Roig's choice; the paper gives no K).
        center_features, pool_to: see :func:`rdm` and :func:`collect_features`.
        device: where the networks and the RDMs run (default: each network's device).

    Returns an :class:`AffinityResult` (``A, rdms = task_affinity(...)`` also works).
    """
    names, nets = _task_names(networks, task_names)
    if isinstance(images, (torch.Tensor, np.ndarray)) or (hasattr(images, "__len__") and hasattr(images, "__getitem__")) or isinstance(
        images, torch.utils.data.DataLoader
    ):
        source = images.dataset if isinstance(images, torch.utils.data.DataLoader) else images
        indices = select_images(len(source), num_images, seed)
        x = _gather_images(source, indices, image_key)
    else:  # an iterable of batches: gather them, then draw the subset
        x = _gather_images(images, None, image_key)
        indices = select_images(x.shape[0], num_images, seed)
        x = x[indices]
    depth = {len(feature_locations(n)) for n in nets}
    if len(depth) != 1:
        raise ValueError(f"the networks have different numbers of locations {sorted(depth)}: they must share one backbone")
    rdms = {}
    for name, net in zip(names, nets):
        rdms[name] = network_rdms(net, x, center_features=center_features, pool_to=pool_to, batch_size=batch_size, device=device)
    del x
    return AffinityResult(
        affinity=affinity_tensor(rdms, names),
        task_names=names,
        location_names=location_names(nets[0]),
        num_images=int(indices.numel()),
        seed=int(seed),
        center_features=bool(center_features),
        pool_to=pool_to if pool_to is None or isinstance(pool_to, int) else tuple(int(s) for s in pool_to),
        indices=indices.numpy(),
        rdms=rdms,
    )


# --- affinity.npz ---------------------------------------------------------------------------------------
def save_affinity(
    path: str | os.PathLike,
    affinity,
    task_names: Sequence[str] | None = None,
    location_names: Sequence[str] | None = None,
    num_images: int | None = None,
    seed: int | None = None,
    center_features: bool = True,
    pool_to: int | Sequence[int] | None = None,
    indices=None,
) -> str:
    """Write ``affinity.npz`` atomically: ``affinity`` ``(D, N, N)``, ``task_names``,
    ``location_names`` (default ``block1 ..``), ``num_images`` (K), ``seed``, ``center_features``,
    ``pool_to`` and the images' ``indices`` where known. ``affinity`` may be an
    :class:`AffinityResult` (its fields are then the defaults). Returns the path."""
    if isinstance(affinity, AffinityResult):
        r = affinity
        task_names = r.task_names if task_names is None else task_names
        location_names = r.location_names if location_names is None else location_names
        num_images = r.num_images if num_images is None else num_images
        seed = r.seed if seed is None else seed
        center_features, pool_to = r.center_features, r.pool_to if pool_to is None else pool_to
        indices = r.indices if indices is None else indices
        affinity = r.affinity
    a = np.asarray(torch.as_tensor(affinity).detach().cpu(), dtype=float)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"affinity must be (D, N, N), got {a.shape}")
    task_names = [f"task{i}" for i in range(a.shape[1])] if task_names is None else [str(t) for t in task_names]
    location_names = [f"block{d + 1}" for d in range(a.shape[0])] if location_names is None else [str(n) for n in location_names]
    if len(task_names) != a.shape[1] or len(location_names) != a.shape[0]:
        raise ValueError(f"affinity {a.shape} does not match {len(task_names)} task names and {len(location_names)} location names")
    arrays = dict(
        affinity=a,
        task_names=np.array(task_names, dtype=str),
        location_names=np.array(location_names, dtype=str),
        num_images=np.array(-1 if num_images is None else int(num_images)),
        seed=np.array(-1 if seed is None else int(seed)),
        center_features=np.array(bool(center_features)),
        pool_to=np.array([] if pool_to is None else np.atleast_1d(np.asarray(pool_to, dtype=np.int64)), dtype=np.int64),
        pool_to_scalar=np.array(isinstance(pool_to, (int, np.integer))),
    )
    if indices is not None:
        arrays["indices"] = np.asarray(indices, dtype=np.int64)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
            np.savez(f, **arrays)
    return os.fspath(path)


def load_affinity(path: str | os.PathLike) -> AffinityResult:
    """Read what :func:`save_affinity` wrote (``rdms`` is ``None``; ``seed`` / ``num_images``
    ``None`` where not saved)."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"affinity", "task_names", "location_names"} - set(z.files)
        if missing:
            raise ValueError(f"{os.fspath(path)} is not an affinity file: no {sorted(missing)}")
        pool = z["pool_to"].tolist() if "pool_to" in z.files else []
        scalar = bool(z["pool_to_scalar"]) if "pool_to_scalar" in z.files else False
        num_images = int(z["num_images"]) if "num_images" in z.files else -1
        seed = int(z["seed"]) if "seed" in z.files else -1
        return AffinityResult(
            affinity=z["affinity"].astype(float),
            task_names=[str(t) for t in z["task_names"]],
            location_names=[str(n) for n in z["location_names"]],
            num_images=None if num_images < 0 else num_images,
            seed=None if seed < 0 else seed,
            center_features=bool(z["center_features"]) if "center_features" in z.files else True,
            pool_to=None if not pool else (int(pool[0]) if scalar else tuple(int(p) for p in pool)),
            indices=z["indices"].copy() if "indices" in z.files else None,
        )


# --- figures ------------------------------------------------------------------------------------------
def _rgb(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def affinity_figure(affinity, task_names: Sequence[str], location_names: Sequence[str] | None = None):
    """Fig. 2a of the paper: one task x task heat map of ``A`` per location, values written in the
    cells (up to 8 tasks). Returns a matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    a = np.asarray(torch.as_tensor(affinity).detach().cpu(), dtype=float)
    if a.ndim == 2:
        a = a[None]
    d_, n = a.shape[0], a.shape[1]
    names = [str(t) for t in task_names]
    locs = [str(s) for s in location_names] if location_names is not None else [f"block{i + 1}" for i in range(d_)]
    vmin = min(0.0, float(np.nanmin(a))) if a.size else 0.0
    side = max(1.6, 0.42 * n + 0.9)
    fig = Figure(figsize=(side * d_ + 0.9, side + 0.7), dpi=100, layout="constrained")
    axes = [fig.add_subplot(1, d_, d + 1) for d in range(d_)]
    im = None
    for d, ax in enumerate(axes):
        im = ax.imshow(a[d], cmap="viridis", vmin=vmin, vmax=1.0, aspect="equal")
        ax.set_title(locs[d], fontsize=9)
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticks(range(n))
        ax.set_yticklabels(names if d == 0 else [], fontsize=7)
        if n <= 8:
            for i in range(n):
                for j in range(n):
                    v = a[d, i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > vmin + 0.6 * (1.0 - vmin) else "white")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, pad=0.02)
    return fig


def affinity_image(*args, **kwargs) -> np.ndarray:
    """:func:`affinity_figure` rendered to an RGB ``uint8`` array ``(H, W, 3)``, for TensorBoard's
    ``add_image(tag, image, step, dataformats="HWC")``."""
    return _rgb(affinity_figure(*args, **kwargs))


def _plain_config(c):
    if isinstance(c, (torch.Tensor, np.ndarray)):
        c = c.tolist()
    if isinstance(c, (list, tuple)):
        return tuple(_plain_config(v) for v in c)
    if isinstance(c, (frozenset, set)):
        return frozenset(_plain_config(v) for v in c)
    return c.item() if isinstance(c, np.generic) else c


def _rows(table) -> list[tuple[object, float, float]]:
    rows = []
    for r in table:
        if isinstance(r, Mapping):
            rows.append((r.get("config"), float(r["cost"]), float(r["params"])))
        else:
            config, cost, params = r[:3]
            rows.append((config, float(cost), float(params)))
    return rows


def pareto_figure(table, chosen=None, budget: float | None = None):
    """Fig. 2b of the paper, as a search plot: the task dissimilarity cost against the parameters
    of every enumerated tree, the trees no other beats on both drawn as a line, the ``chosen`` one
    marked (an ``int``: its row; a mapping: its ``"config"``; otherwise a config compared with the
    rows'), ``budget`` as a vertical line. ``table`` is a sequence of ``(config, cost, params)``
    tuples or of dicts with those keys. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    rows = _rows(table)
    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if rows:
        cost = np.array([r[1] for r in rows])
        params = np.array([r[2] for r in rows])
        ax.scatter(params, cost, s=14, c="tab:blue", alpha=0.6, label="trees")
        order = np.lexsort((cost, params))
        front, best = [], math.inf
        for i in order:
            if cost[i] < best:
                front.append(i)
                best = cost[i]
        ax.step(params[front], cost[front], where="post", color="tab:orange", linewidth=1.2, label="best under budget")
        pick = None
        if isinstance(chosen, (int, np.integer)) and not isinstance(chosen, bool):
            pick = int(chosen)
        elif chosen is not None:
            target = _plain_config(chosen["config"] if isinstance(chosen, Mapping) else chosen)
            pick = next((i for i, r in enumerate(rows) if _plain_config(r[0]) == target), None)
        if pick is not None:
            ax.scatter([params[pick]], [cost[pick]], s=120, marker="*", c="red", zorder=3, label="chosen")
    if budget is not None:
        ax.axvline(float(budget), color="gray", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("parameters")
    ax.set_ylabel("task dissimilarity cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def pareto_image(*args, **kwargs) -> np.ndarray:
    """:func:`pareto_figure` rendered to an RGB ``uint8`` array ``(H, W, 3)``."""
    return _rgb(pareto_figure(*args, **kwargs))


def _tree_levels(config, num_tasks: int) -> list[list[tuple[int, ...]]]:
    """Per level, the groups of task indices of the (canonical) tree."""
    levels = tree_partitions(_plain_config(config))
    if any(sum(len(g) for g in level) != num_tasks for level in levels):
        raise ValueError(f"the tree does not cover {num_tasks} tasks at every level")
    return levels


def tree_figure(config, task_names: Sequence[str], block_names: Sequence[str] | None = None):
    """The tree of a branched network (fig. 1b): a shared stem on top, one level per branchable
    block with one node per branch (the tasks it serves, in the node's label), the tasks as leaves.
    ``config`` is the ``blocks x tasks`` branch-label matrix (bmtas ``branch_config``). Returns a
    matplotlib Figure."""
    from matplotlib.figure import Figure

    names = [str(t) for t in task_names]
    n = len(names)
    levels = _tree_levels(config, n)
    blocks = [str(b) for b in block_names] if block_names is not None else [f"block{l + 1}" for l in range(len(levels))]
    # leaves ordered so that every branch's tasks are contiguous
    order = sorted(range(n), key=lambda t: [next(i for i, g in enumerate(lv) if t in g) for lv in levels] + [t])
    xpos = {t: float(i) for i, t in enumerate(order)}
    depth = len(levels) + 2  # stem, blocks, leaves
    fig = Figure(figsize=(max(3.2, 1.0 * n + 1.6), max(2.4, 0.75 * depth + 0.6)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    box = dict(boxstyle="round,pad=0.25", fc="white", ec="tab:blue")
    stem = (float(np.mean(list(xpos.values()))), 0.0)
    prev = [(tuple(range(n)), stem)]
    ax.text(*stem, "stem", ha="center", va="center", fontsize=8, bbox=dict(box, ec="gray"))
    for l, groups in enumerate(levels):
        y = -(l + 1.0)
        cur = []
        for g in groups:
            xy = (float(np.mean([xpos[t] for t in g])), y)
            parent = next(p for p in prev if set(g) <= set(p[0]))
            ax.plot([parent[1][0], xy[0]], [parent[1][1], xy[1]], color="gray", linewidth=1, zorder=1)
            ax.scatter([xy[0]], [xy[1]], s=60, c="tab:blue", zorder=2)
            cur.append((g, xy))
        prev = cur
    y = -(len(levels) + 1.0)
    for t in range(n):
        parent = next(p for p in prev if t in p[0])
        ax.plot([parent[1][0], xpos[t]], [parent[1][1], y], color="gray", linewidth=1, zorder=1)
        ax.text(xpos[t], y, names[t], ha="center", va="center", fontsize=8, bbox=dict(box, ec="tab:green"))
    ax.set_yticks([-(l + 1.0) for l in range(len(levels))])
    ax.set_yticklabels(blocks, fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(y - 0.6, 0.6)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def tree_image(*args, **kwargs) -> np.ndarray:
    """:func:`tree_figure` rendered to an RGB ``uint8`` array ``(H, W, 3)``."""
    return _rgb(tree_figure(*args, **kwargs))
