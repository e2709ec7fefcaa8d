"""One way to compose and log a multi-task loss, whatever the sharing mechanism."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

from mtl_med.networks.utils import unwrap

__all__ = ["MultiTaskLoss"]


class MultiTaskLoss(nn.Module):
    """``sum_k w_k * L_k(output_k, target_k) + model.regularizer()``.

    Args:
        losses: task name -> loss callable ``(input, target[, mask]) -> scalar``. A loss whose
            ``forward`` takes ``mask`` receives the batch's mask of valid voxels.
        weights: task name -> weight (default 1 for each task).
        use_regularizer: add ``model.regularizer()`` (the SFG term of eq. 5, AdaShare's
            policy losses, ...) when ``forward`` is given a model that has one.

    ``forward`` returns ``(total, terms)``: ``terms`` maps each task name (and ``"regularizer"``)
    to a detached value, ready for logging. Tasks missing from ``outputs`` (one task per
    mini-batch, as Task Routing trains) are skipped.
    """

    def __init__(
        self,
        losses: Mapping[str, Callable],
        weights: Mapping[str, float] | None = None,
        use_regularizer: bool = True,
    ):
        super().__init__()
        if not losses:
            raise ValueError("MultiTaskLoss needs at least one task loss")
        unknown = set(weights or {}) - set(losses)
        if unknown:
            raise ValueError(f"weights given for unknown tasks {sorted(unknown)}; tasks are {sorted(losses)}")
        self.losses = nn.ModuleDict({k: v for k, v in losses.items() if isinstance(v, nn.Module)})
        self._fns = dict(losses)
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in losses}
        self.use_regularizer = use_regularizer
        self._takes_mask = {k: "mask" in inspect.signature(getattr(f, "forward", f)).parameters for k, f in losses.items()}

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        mask: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = None, {}
        for name, fn in self._fns.items():
            if name not in outputs:
                continue
            if name not in targets:
                raise KeyError(f"no target for task {name!r}; targets hold {sorted(targets)}")
            value = fn(outputs[name], targets[name], mask=mask) if self._takes_mask[name] else fn(outputs[name], targets[name])
            terms[name] = value.detach()
            total = self.weights[name] * value if total is None else total + self.weights[name] * value
        if total is None:
            raise KeyError(f"outputs {sorted(outputs)} hold none of the tasks {sorted(self._fns)}")
        module = unwrap(model)
        if self.use_regularizer and module is not None and hasattr(module, "regularizer"):
            reg = module.regularizer()
            terms["regularizer"] = reg.detach()
            total = total + reg
        return total, terms
