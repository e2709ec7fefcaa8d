"""Selective Sharing (Strezoski, van Noord and Worring, ICMR 2019): task groups learned while training.

The network (section 3, A.1): the backbone's trunk extracts features, one hard-shared fully
connected layer follows, then identical, identically initialised task-specific branches (FC layers),
then one output layer per task. At the end of each epoch the branches whose first-FC weight
gradients look alike are grouped (sections 3.1-3.3) and each group keeps one branch (3.4): its tasks
then differ only in their output layers. Grouping stops once every task shares a branch or nothing
changed for three epochs (3.3); the architecture is then locked and training continues.

The package holds the method and its pieces:

- :class:`SelectiveSharing` (this module), the sharing method (``build_network(..., "selective")``). The branches'
  weights are one batched tensor per layer, ``(branches, out, in)``, indexed by the persistent buffer
  ``branch_of_task``: a merge rewrites that map only, so state-dict keys, the optimiser's state and
  DDP's parameter list stay valid.
- :mod:`.ttsvd`: :func:`tt_svd` and :func:`tt_reconstruct`, the tensor-train decomposition (eq. 4-5), written in
  torch, with fixed ranks and sign-fixed cores so that branches can be compared.
- :func:`tensorize_shape`, :class:`FactorAccumulator`: a branch's gradient as a 4-way tensor, its TT
  factors per mini-batch, stacked over the epoch and normalised (one clustering point per branch).
- :mod:`.clustering`: :func:`cluster_branches` (HDBSCAN, the four sharing conditions of A.2), :func:`pick_survivor`,
  :func:`merge_groups` and :class:`StopRule`.

The training side (gradient capture, clustering, merging, records) is
:class:`mtl_med.sharing.selective.handler.SelectiveSharingHandler`, which :meth:`SelectiveSharing.train_handlers`
returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Pool
from torch import nn

from mtl_med.networks.blocks import Backbone, Trunk
from mtl_med.networks.heads import DenseHeads, PooledHeads

from ..base import MultiTaskNetwork
from .clustering import CONDITIONS, StopRule

__all__ = ["SelectiveSharing"]


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
