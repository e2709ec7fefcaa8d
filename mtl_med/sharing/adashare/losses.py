"""AdaShare policy losses (Sun et al., NeurIPS 2020, section 3.2, eq. 4-7).

The task term of eq. 4, ``sum_k lambda_k L_k``, is :class:`mtl_med.losses.MultiTaskLoss` with
``weights=lambda``; the policy terms below enter through the network's ``regularizer()``.
``alpha`` is the ``(K, L)`` matrix of probabilities of executing block ``l`` for task ``k``
(:meth:`mtl_med.sharing.adashare.gate.BlockPolicy.select_probability`).
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_med.losses.dense import DENSE_TASK_WEIGHTS

__all__ = ["ADASHARE_HPARAMS", "adashare_sparsity_loss", "adashare_sharing_loss", "policy_loss_scales", "AdaShareRegularizer"]

#: Table 7 of the paper: learning rates and loss weights per benchmark.
#: The task weights (``lambda``, the paper's keys ``sn`` / ``kp``) are
#: :data:`mtl_med.losses.dense.DENSE_TASK_WEIGHTS`, by task kind.
_PAPER_KEY = {"seg": "seg", "normal": "sn", "depth": "depth", "keypoint": "kp", "edge": "edge"}
ADASHARE_HPARAMS = {
    name: {**h, "lambda": {_PAPER_KEY[k]: v for k, v in DENSE_TASK_WEIGHTS[name].items()}}
    for name, h in {
        "nyu_v2_2task": {"weight_lr": 0.001, "policy_lr": 0.01, "lambda_sp": 0.05, "lambda_sh": 0.05},
        "cityscapes": {"weight_lr": 0.0001, "policy_lr": 0.01, "lambda_sp": 0.01, "lambda_sh": 0.1},
        "nyu_v2_3task": {"weight_lr": 0.001, "policy_lr": 0.01, "lambda_sp": 0.001, "lambda_sh": 0.05},
        "tiny_taskonomy": {"weight_lr": 0.001, "policy_lr": 0.01, "lambda_sp": 0.001, "lambda_sh": 0.005},
    }.items()
}
# defaults: the ResNet-18 set-up (NYU v2 2-task row of Table 7)
DEFAULT_LAMBDA_SPARSITY = ADASHARE_HPARAMS["nyu_v2_2task"]["lambda_sp"]
DEFAULT_LAMBDA_SHARING = ADASHARE_HPARAMS["nyu_v2_2task"]["lambda_sh"]


def _check(alpha: torch.Tensor) -> None:
    if alpha.ndim != 2:
        raise ValueError(f"alpha must be (num_tasks, num_blocks), got shape {tuple(alpha.shape)}")


def adashare_sparsity_loss(alpha: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Eq. 5: ``sum_{l,k} log alpha_{l,k}`` (minimised: fewer executed blocks).

    The paper's form is unbounded below as ``alpha -> 0``; it is weighted with the small
    ``lambda_sp`` of Table 7. ``eps`` (default 0, the paper) clamps ``alpha`` from below.
    """
    _check(alpha)
    return alpha.clamp_min(eps).log().sum() if eps > 0 else alpha.log().sum()


def adashare_sharing_loss(alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``sum_{k1,k2} sum_l (L - l)/L |alpha_{l,k1} - alpha_{l,k2}|``, ``l = 1..L``.

    Sums over ordered task pairs as written; the weight ``(L - l)/L`` is largest for the bottom
    block, so sharing the low-level blocks is encouraged most. (The authors' released code weights
    block ``l`` by ``l/L``, over unordered pairs of raw logits; this follows the paper.)
    """
    _check(alpha)
    num_blocks = alpha.shape[1]
    l = torch.arange(1, num_blocks + 1, dtype=alpha.dtype, device=alpha.device)
    w = (num_blocks - l) / num_blocks
    diff = (alpha[:, None, :] - alpha[None, :, :]).abs()  # (K, K, L)
    return (diff * w).sum()


def policy_loss_scales(num_tasks: int, num_blocks: int) -> tuple[float, float]:
    """The factors ``(s_sp, s_sh)`` that make eq. 5-6 independent of the task and block counts.

    Table 7's weights were tuned in the authors' code, which takes each task's sparsity term as
    the *mean* over its blocks and the sharing term over the one unordered pair of a 2-task
    network. Written as the paper's sums (eq. 5 over ``K x L`` entries, eq. 6 over ordered pairs),
    the same weights grow with the set-up: each logit's sharing gradient grows with ``K - 1``
    (it is pulled towards every other task, twice), and the loss value with ``K L``. The rule:

    - ``s_sp = 1 / L``: each task's sparsity is the mean of ``log alpha`` over its blocks;
    - ``s_sh = 1 / (2 (K - 1))``: each task is pulled towards the *mean* of the other tasks.

    For ``K = 2`` this is the authors' normalisation, so Table 7's values keep their meaning, and
    a 10-task, 8-block network feels the same per-task pressure as a 2-task one.
    """
    k, l = int(num_tasks), int(num_blocks)
    return 1.0 / l, (1.0 / (2 * (k - 1)) if k > 1 else 0.0)


class AdaShareRegularizer(nn.Module):
    """``lambda_sp * L_sparsity + lambda_sh * L_sharing`` of eq. 7.

    Args:
        lambda_sparsity: weight of eq. 5 (Table 7; default 0.05, NYU v2 2-task).
        lambda_sharing: weight of eq. 6 (Table 7; default 0.05, NYU v2 2-task).
        normalize: scale both terms by :func:`policy_loss_scales` of ``alpha``'s shape (default),
            so the weights mean the same for any number of tasks and blocks; ``False``: the sums
            exactly as eq. 5-6 write them.
    """

    def __init__(
        self,
        lambda_sparsity: float = DEFAULT_LAMBDA_SPARSITY,
        lambda_sharing: float = DEFAULT_LAMBDA_SHARING,
        normalize: bool = True,
    ):
        super().__init__()
        self.lambda_sparsity, self.lambda_sharing = float(lambda_sparsity), float(lambda_sharing)
        self.normalize = bool(normalize)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        _check(alpha)
        s_sp, s_sh = policy_loss_scales(*alpha.shape) if self.normalize else (1.0, 1.0)
        return s_sp * self.lambda_sparsity * adashare_sparsity_loss(alpha) + s_sh * self.lambda_sharing * adashare_sharing_loss(alpha)

    def extra_repr(self) -> str:
        return f"lambda_sparsity={self.lambda_sparsity}, lambda_sharing={self.lambda_sharing}, normalize={self.normalize}"
