"""AdaShare (Sun et al., NeurIPS 2020): a per-task select-or-skip policy over the residual blocks
of any backbone that has them (section 3.1), and its training strategy (section 3.3).

The network: :class:`AdaShare`, a trunk whose residual blocks are gated by a
:class:`~mtl_med.sharing.adashare.gate.BlockPolicy`; its regulariser is eq. 7's sparsity and sharing
losses while the policy is learned. The strategy, as reusable pieces: warm up the weights with
every block shared (``set_policy_mode(model, "warmup")``), then in each epoch ``l = 1, 2, ...``
learn the policy of the last ``l`` blocks only (:func:`apply_curriculum`), alternating 80% of the
training data for the weights (SGD) and 20% for the policy logits (Adam)
(:func:`split_weight_policy_data`, :func:`make_optimizers`), annealing the temperature after each
alternation. Re-training phase: sample a discrete policy
(:func:`sample_policy`) and train the network it defines from scratch
(:func:`build_retrain_network`). The policy is saved with :func:`export_policy_json` and drawn as
the paper's fig. 3 grid by :func:`policy_figure` / :func:`policy_image`. The search as a MONAI
engine run: :class:`~mtl_med.sharing.adashare.search.AdaShareSearch`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, random_split

from mtl_med.io import atomic_write_text
from mtl_med.networks.blocks import Backbone, LayerFactory, Residual, Trunk
from mtl_med.networks.utils import unwrap as _unwrap

from ..base import MultiTaskNetwork, TaskContext
from .gate import BlockPolicy
from .losses import ADASHARE_HPARAMS, DEFAULT_LAMBDA_SHARING, DEFAULT_LAMBDA_SPARSITY, AdaShareRegularizer

__all__ = [
    "AdaShare",
    "GatedBlock",
    "policy_module",
    "set_policy_mode",
    "curriculum_num_blocks",
    "apply_curriculum",
    "split_parameters",
    "make_optimizers",
    "split_weight_policy_data",
    "sample_policy",
    "build_retrain_network",
    "export_policy_json",
    "load_policy_json",
    "policy_figure",
    "policy_image",
]


class GatedBlock(nn.Module):
    """A residual block under the context's gate ``g`` for it: ``None`` runs the block, a Python
    ``bool`` runs or skips it (nothing computed when skipped), a scalar or ``(B,)`` tensor gives
    ``g * block(x) + (1 - g) * shortcut(x)`` (section 3.1)."""

    def __init__(self, block: nn.Module, index: int, context: TaskContext):
        super().__init__()
        self.block, self.index, self.context = block, int(index), context

    def forward(self, x):
        g = None if self.context.gates is None else self.context.gates[self.index]
        if g is None or (isinstance(g, bool) and g):
            return self.block(x)
        s = self.block.shortcut(x)
        if isinstance(g, bool):
            return s
        out = self.block.combine(self.block.residual(x), s)
        g = g.reshape(g.shape + (1,) * (out.ndim - g.ndim)) if g.ndim else g
        return g * out + (1 - g) * s


class _GatingFactory(LayerFactory):
    def __init__(self, backbone: Backbone, context: TaskContext):
        super().__init__(backbone.spatial_dims, backbone.norm, backbone.act)
        self.context = context

    def block(self, block, index):
        return GatedBlock(block, index, self.context)


class AdaShare(MultiTaskNetwork):
    """Every residual block of the backbone gated per task by a select-or-skip policy.

    Args:
        tau: initial Gumbel-Softmax temperature (section 3.2: 5).
        lambda_sparsity, lambda_sharing: eq. 7 weights of :meth:`regularizer` while the policy is
            learned (Table 7 defaults).
        normalize_policy_losses: scale eq. 5-6 to the number of tasks and blocks
            (:func:`mtl_med.sharing.adashare.losses.policy_loss_scales`), so Table 7's weights keep their
            meaning on any set-up; ``False``: the raw sums of eq. 5-6.
        policy: a discrete ``(num_tasks, num_blocks)`` policy for re-training / inference.

    In the ``"warmup"`` mode every block runs and the trunk is computed once for all tasks.
    """

    name = "adashare"
    may_skip_parameters = True

    def __init__(
        self,
        backbone: Backbone,
        task_names,
        heads,
        tau: float = 5.0,
        lambda_sparsity: float = DEFAULT_LAMBDA_SPARSITY,
        lambda_sharing: float = DEFAULT_LAMBDA_SHARING,
        normalize_policy_losses: bool = True,
        policy: torch.Tensor | Sequence | None = None,
        bn_inference: str = "population",
    ):
        super().__init__(backbone, task_names, heads, bn_inference)
        self.trunk = Trunk(backbone, _GatingFactory(backbone, self.context))
        res = backbone.residual_indices
        # "stage{s}.{i}": block i of the stage after branch point s - 1
        stage = [sum(b < i for b in backbone.branch_points) for i in res]
        self.block_names = [f"stage{s}.{stage[:j].count(s)}" for j, s in enumerate(stage)]
        self.policy = BlockPolicy(self.num_tasks, len(res), tau=tau, policy=policy)
        self.policy_loss = AdaShareRegularizer(lambda_sparsity, lambda_sharing, normalize_policy_losses)

    @classmethod
    def refuse(cls, backbone: Backbone) -> str | None:
        if not backbone.residual_indices:
            return (
                "AdaShare decides per task whether to execute or skip each residual block (section 3.1), and a skipped"
                " block must leave its shortcut: this backbone has no residual blocks"
            )
        return None

    @property
    def num_blocks(self) -> int:
        return self.policy.num_blocks

    def policy_parameters(self) -> list[nn.Parameter]:
        return [self.policy.logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("policy.")]

    def regularizer(self) -> torch.Tensor:
        """``lambda_sp L_sparsity + lambda_sh L_sharing`` (eq. 7) while the policy is learned, else 0."""
        if self.policy.mode != "learn":
            return self.policy.logits.new_zeros(())
        return self.policy_loss(self.policy.select_probability(effective=True))

    def _run(self, x, gates):
        with self.in_context(gates=gates):
            return self.trunk(x)

    def task_features(self, x, task, generator=None):
        gates = self.policy.gates(generator)
        if gates is None:
            y = self.trunk(x)
            return [y] * self.num_tasks if task is None else y
        if task is None:
            return [self.task_features_of(x, gates, k) for k in range(self.num_tasks)]
        return self.task_features_of(x, gates, task)

    def task_features_of(self, x, gates, task):
        if isinstance(task, torch.Tensor):
            return self._run(x, [gates[task.to(gates.device), l] for l in range(self.num_blocks)])
        if self.policy.mode == "fixed":
            return self._run(x, [bool(v) for v in self.policy.policy[task].tolist()])
        return self._run(x, list(gates[task].unbind(0)))


def policy_module(model: nn.Module):
    """The :class:`~mtl_med.sharing.adashare.gate.BlockPolicy` of an AdaShare network."""
    policy = getattr(_unwrap(model), "policy", None)
    if policy is None or not hasattr(policy, "logits"):
        raise ValueError(f"{type(_unwrap(model)).__name__} has no AdaShare policy (build it with sharing='adashare')")
    return policy


def set_policy_mode(model: nn.Module, mode: str) -> None:
    """``"warmup"`` (all blocks shared), ``"learn"`` (Gumbel-Softmax) or ``"fixed"`` (discrete policy)."""
    policy_module(model).set_mode(mode)


def curriculum_num_blocks(epoch: int, num_blocks: int, speed: int = 1) -> int:
    """Blocks whose policy is learned in policy-learning epoch ``epoch`` (1-based):
    ``min(ceil(epoch / speed), L)``, one more block every ``speed`` epochs (section 3.3: one per
    epoch; the authors' code: one every ``curriculum_speed`` = 3 alternations)."""
    if int(speed) < 1:
        raise ValueError(f"curriculum speed must be >= 1 epochs per block, got {speed}")
    return max(0, min(-(-int(epoch) // int(speed)), int(num_blocks)))


def apply_curriculum(model: nn.Module, epoch: int, speed: int = 1) -> int:
    """Section 3.3 curriculum: in epoch ``l`` learn the last ``l`` blocks (``ceil(l / speed)``);
    the first ones are executed by every task and their logits get zero gradient. Returns the
    learned block count."""
    policy = policy_module(model)
    n = curriculum_num_blocks(epoch, policy.num_blocks, speed)
    policy.set_num_learnable(n)
    return n


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weight_parameters, policy_parameters)``: network weights and AdaShare policy logits."""
    policy = policy_module(model)
    ids = {id(p) for p in policy.parameters()}
    weights = [p for p in _unwrap(model).parameters() if id(p) not in ids]
    return weights, list(policy.parameters())


def make_optimizers(
    model: nn.Module,
    weight_lr: float = ADASHARE_HPARAMS["nyu_v2_2task"]["weight_lr"],
    policy_lr: float = ADASHARE_HPARAMS["nyu_v2_2task"]["policy_lr"],
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> tuple[torch.optim.SGD, torch.optim.Adam]:
    """SGD for the weights and Adam for the policy (section 4, Table 7 learning rates).

    The policy optimiser has no weight decay, so curriculum-frozen logits (zero gradient) stay
    exactly unchanged.
    """
    weights, policy = split_parameters(model)
    return (
        torch.optim.SGD(weights, lr=weight_lr, momentum=momentum, weight_decay=weight_decay),
        torch.optim.Adam(policy, lr=policy_lr),
    )


def split_weight_policy_data(dataset: Dataset, weight_fraction: float = 0.8, seed: int = 0) -> tuple[Subset, Subset]:
    """Seeded disjoint split of the training set: ``weight_fraction`` (80%, section 3.3) for the
    weights, the rest for the policy logits."""
    if not 0.0 < weight_fraction < 1.0:
        raise ValueError(f"weight_fraction must be in (0, 1), got {weight_fraction}")
    n = len(dataset)
    n_weight = int(round(weight_fraction * n))
    if n_weight in (0, n):
        raise ValueError(f"a dataset of {n} items cannot be split {weight_fraction:.0%}/{1 - weight_fraction:.0%}")
    w, p = random_split(dataset, [n_weight, n - n_weight], generator=torch.Generator().manual_seed(int(seed)))
    return w, p


def sample_policy(model: nn.Module, generator: torch.Generator | None = None, deterministic: bool = False) -> torch.Tensor:
    """A discrete ``(K, L)`` bool select-or-skip policy from the learned distribution (section 3.3)."""
    return policy_module(model).sample(generator=generator, deterministic=deterministic)


def build_retrain_network(model: nn.Module, policy: torch.Tensor | Sequence, seed: int | None = None) -> nn.Module:
    """A fresh network built as ``model`` was (its ``build_args``, :meth:`~mtl_med.sharing.base.MultiTaskNetwork.rebuild`)
    with the discrete ``policy``.

    Its weights are newly initialised (re-trained from scratch, section 3.3); ``seed`` seeds the
    initialisation (torch's global RNG is used and restored).
    """
    policy_module(model)  # a clear error for a network without a policy
    base = _unwrap(model)
    policy = torch.as_tensor(policy).bool().cpu()
    if seed is None:
        return base.rebuild(policy=policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return base.rebuild(policy=policy)


def export_policy_json(
    path: str | os.PathLike,
    model: nn.Module,
    policy: torch.Tensor | None = None,
) -> dict:
    """Write the task names, block names, ``alpha`` and a discrete policy (default: the network's
    fixed policy, or the most likely decisions) to JSON; returns the written dictionary."""
    base, pm = _unwrap(model), policy_module(model)
    if policy is None:
        policy = pm.policy if pm.mode == "fixed" else pm.sample(deterministic=True)
    record = {
        "task_names": list(getattr(base, "task_names", [f"task_{k}" for k in range(pm.num_tasks)])),
        "block_names": list(getattr(base, "block_names", [f"block_{l}" for l in range(pm.num_blocks)])),
        "select_probability": pm.select_probability().detach().cpu().tolist(),
        "policy": torch.as_tensor(policy).int().cpu().tolist(),
        "tau": float(pm.tau),
    }
    atomic_write_text(json.dumps(record, indent=2), path)
    return record


def load_policy_json(path: str | os.PathLike) -> dict:
    """Read :func:`export_policy_json` output; ``"policy"`` comes back as a ``(K, L)`` bool tensor."""
    with open(path) as f:
        record = json.load(f)
    for key in ("task_names", "policy"):
        if key not in record:
            raise ValueError(f"{path}: not an AdaShare policy file (no {key!r})")
    record["policy"] = torch.tensor(record["policy"], dtype=torch.bool)
    if record["policy"].shape[0] != len(record["task_names"]):
        raise ValueError(f"{path}: policy has {record['policy'].shape[0]} rows for {len(record['task_names'])} tasks")
    return record


def policy_figure(
    select_probability: torch.Tensor | np.ndarray,
    policy: torch.Tensor | np.ndarray | None = None,
    task_names: Sequence[str] | None = None,
    block_names: Sequence[str] | None = None,
):
    """Fig. 3 of the paper: a task x block grid whose darkness is the probability of selecting the
    block; a cross marks a skipped block of the discrete ``policy``. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    alpha = np.asarray(torch.as_tensor(select_probability).detach().cpu(), dtype=float)
    k, l = alpha.shape
    fig = Figure(figsize=(max(3.0, 0.45 * l + 1.5), max(1.5, 0.45 * k + 0.8)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(alpha, cmap="Blues", vmin=0.0, vmax=1.0, aspect="equal")
    if policy is not None:
        skipped = np.argwhere(~np.asarray(torch.as_tensor(policy).cpu(), dtype=bool))
        if len(skipped):
            ax.scatter(skipped[:, 1], skipped[:, 0], marker="x", c="red", s=40)
    ax.set_xticks(range(l))
    ax.set_xticklabels(block_names or [str(i + 1) for i in range(l)], rotation=90, fontsize=7)
    ax.set_yticks(range(k))
    ax.set_yticklabels(task_names or [f"task {i}" for i in range(k)], fontsize=8)
    ax.set_xticks(np.arange(-0.5, l, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    fig.tight_layout()
    return fig


def policy_image(*args, **kwargs) -> np.ndarray:
    """:func:`policy_figure` rendered to an RGB ``uint8`` array ``(H, W, 3)``, for TensorBoard's
    ``add_image(tag, image, step, dataformats="HWC")``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = policy_figure(*args, **kwargs)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
