"""Per-pixel task losses for dense multi-task learning and AdaShare's task weights (Table 7).

Targets follow :mod:`mtl_med.data.dense`: labels with an ignore index (-1), depth 0 where invalid, normals
0 where invalid. Each loss averages over the pixels it can score; a batch with none gives 0 (with a
gradient path), not NaN. ``mask`` (``MultiTaskLoss`` passes the batch's mask of valid pixels, or
Taskonomy's per-pixel segmentation weights) multiplies the per-pixel terms.

* segmentation: cross-entropy with an ignore index;
* depth (and Taskonomy's keypoints and edges): L1 over valid pixels (AdaShare, mtan and LibMTL use L1);
* normals: ``1 - cos`` between the normalised prediction and the target (research notes, section 3.2).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PixelCrossEntropyLoss", "MaskedL1Loss", "NormalCosineLoss", "DENSE_LOSSES", "dense_losses",
           "DENSE_TASK_WEIGHTS", "dense_task_weights"]


def _mask_like(mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """A ``(B, H, W)`` or ``(B, 1, H, W)`` mask as ``ref``'s ``(B, H, W)``."""
    if mask is None:
        return None
    if mask.ndim == ref.ndim + 1:
        mask = mask[:, 0]
    return mask.reshape(ref.shape)


class PixelCrossEntropyLoss(nn.Module):
    """Cross-entropy of ``(B, C, H, W)`` logits against ``(B, H, W)`` (or ``(B, 1, H, W)``) labels, mean over
    labelled pixels (``ignore_index`` excluded; mtan, LibMTL and AdaShare)."""

    def __init__(self, ignore_index: int = -1):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = target.long()
        if target.ndim == input.ndim:
            target = target[:, 0]
        valid = target != self.ignore_index
        ce = F.cross_entropy(input, torch.where(valid, target, 0), reduction="none")
        return _weighted(ce, valid, _mask_like(mask, target))


def _weighted(values: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    w = valid.to(values.dtype) if mask is None else valid.to(values.dtype) * mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


class MaskedL1Loss(nn.Module):
    """Mean ``|p - g|`` over pixels whose target is valid: ``g > 0`` for depth (``positive_only``, 0 marks a
    missing return) or every finite pixel (Taskonomy's keypoints and edges, which may be negative)."""

    def __init__(self, positive_only: bool = True):
        super().__init__()
        self.positive_only = bool(positive_only)

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = target.to(input.dtype).reshape(input.shape)
        valid = (target > 0) if self.positive_only else torch.isfinite(target)
        err = (input - torch.where(valid, target, 0)).abs()
        m = None if mask is None else _mask_like(mask, target[:, 0])[:, None].expand_as(target)
        return _weighted(err, valid, m)


class NormalCosineLoss(nn.Module):
    """``1 - cos(p, g)`` per pixel, ``p`` the normalised ``(B, 3, H, W)`` prediction, over pixels with a
    non-zero target (0 marks an invalid normal)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = target.to(input.dtype)
        valid = target.norm(dim=1) > 0
        cos = (F.normalize(input, dim=1) * F.normalize(target, dim=1)).sum(1)
        return _weighted(1.0 - cos, valid, _mask_like(mask, valid))


#: task kind -> loss factory
DENSE_LOSSES = {
    "seg": PixelCrossEntropyLoss,
    "depth": MaskedL1Loss,
    "normal": NormalCosineLoss,
    "keypoint": lambda: MaskedL1Loss(positive_only=False),
    "edge": lambda: MaskedL1Loss(positive_only=False),
}


def dense_losses(kinds: Mapping[str, str], ignore_index: int = -1) -> dict[str, nn.Module]:
    """One loss per task, ``kinds = {task: "seg" | "depth" | "normal" | "keypoint" | "edge"}``, ready for
    :class:`mtl_med.losses.MultiTaskLoss`."""
    out = {}
    for task, kind in kinds.items():
        if kind not in DENSE_LOSSES:
            raise ValueError(f"task {task!r}: kind must be one of {sorted(DENSE_LOSSES)}, got {kind!r}")
        out[task] = PixelCrossEntropyLoss(ignore_index) if kind == "seg" else DENSE_LOSSES[kind]()
    return out


#: The task weights per benchmark, by task kind, of AdaShare's Table 7 (the benchmark set-up the dense
#: bundle follows; :data:`mtl_med.sharing.adashare.losses.ADASHARE_HPARAMS` reads its ``lambda`` from here)
DENSE_TASK_WEIGHTS = {
    "nyu_v2_2task": {"seg": 1.0, "normal": 20.0},
    "cityscapes": {"seg": 1.0, "depth": 20.0},
    "nyu_v2_3task": {"seg": 1.0, "normal": 20.0, "depth": 3.0},
    "tiny_taskonomy": {"seg": 1.0, "normal": 3.0, "depth": 2.0, "keypoint": 7.0, "edge": 7.0},
}


def dense_task_weights(benchmark: str, kinds: Mapping[str, str]) -> dict[str, float]:
    """``{task: lambda}`` for ``kinds = {task: kind}`` from Table 7's row ``benchmark`` (``nyu_v2_2task``,
    ``cityscapes``, ``nyu_v2_3task``, ``tiny_taskonomy``)."""
    if benchmark not in DENSE_TASK_WEIGHTS:
        raise ValueError(f"benchmark must be one of {sorted(DENSE_TASK_WEIGHTS)}, got {benchmark!r}")
    row = DENSE_TASK_WEIGHTS[benchmark]
    missing = sorted({k for k in kinds.values()} - set(row))
    if missing:
        raise ValueError(f"Table 7's {benchmark} row has no weight for {missing}; it weighs {sorted(row)}")
    return {task: row[kind] for task, kind in kinds.items()}
