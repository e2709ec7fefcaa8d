"""Cross-stitch units (Misra et al., CVPR 2016) for any number of tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CrossStitch"]


class CrossStitch(nn.Module):
    """Learned linear mixing of T same-shaped task activations: ``x~_t = sum_u alpha_tu x_u``.

    Args:
        num_tasks: T.
        num_channels: with ``per_channel=True``, one ``T x T`` matrix per channel (Misra et al.
            share alpha across a layer's channels or learn it per channel; both are offered).
        self_weight: initial ``alpha_tt``; the rest ``(1 - self_weight) / (T - 1)`` per task, so
            each row sums to one. Misra et al. initialise ``(alpha_S, alpha_D) = (0.9, 0.1)``.
    """

    def __init__(self, num_tasks: int, num_channels: int | None = None, self_weight: float = 0.9, per_channel: bool = False):
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"cross-stitch needs at least 2 tasks, got {num_tasks}")
        other = (1.0 - self_weight) / (num_tasks - 1)
        alpha = torch.full((num_tasks, num_tasks), other).fill_diagonal_(self_weight)
        if per_channel:
            if not num_channels:
                raise ValueError("per_channel cross-stitch needs num_channels")
            alpha = alpha.unsqueeze(-1).repeat(1, 1, num_channels)
        self.num_tasks, self.per_channel = num_tasks, per_channel
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task activations, got {len(xs)}")
        x = torch.stack(list(xs), 0)  # T, B, C, *spatial
        alpha = self.alpha.to(x.dtype)  # under autocast the activations may be bfloat16 / float16
        if self.per_channel:
            a = alpha.reshape(*alpha.shape[:2], 1, -1, *([1] * (x.ndim - 3)))
            y = (a * x.unsqueeze(0)).sum(1)
        else:
            y = torch.tensordot(alpha, x, dims=([1], [0]))
        return list(y.unbind(0))
