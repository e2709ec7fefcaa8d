"""What every network built from SFG layers shares: the eq. 5 regulariser, the temperature, the
test-time behaviour (sampling, batch-norm statistics) and the introspection of the learned
architecture."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..layers.sfg import SHARING_MODES, SFGConv
from .utils import batch_norm_statistics

__all__ = ["SFGNetwork"]


class SFGNetwork(nn.Module):
    """Base class of networks made of :class:`~mtl_med.layers.sfg.SFGConv` layers.

    Args:
        task_names: one name per task; ``forward`` returns ``{name: output}``.
        sharing: one of :data:`~mtl_med.layers.sfg.SHARING_MODES` (``"sfg"`` or a paper baseline).
        lambda1, lambda2: weights of eq. 5 (A.1: 1e-6 and 1e-5).
        bn_inference: test-time batch-norm statistics, ``"population"`` (running averages) or
            ``"batch"`` (statistics of the test batch, which A.4 found better).
    """

    def __init__(
        self,
        task_names: Sequence[str],
        sharing: str = "sfg",
        lambda1: float = 1e-6,
        lambda2: float = 1e-5,
        bn_inference: str = "population",
    ):
        super().__init__()
        if len(task_names) < 2 or len(set(task_names)) != len(task_names):
            raise ValueError(f"need at least two distinct task names, got {list(task_names)}")
        if sharing not in SHARING_MODES:
            raise ValueError(f"unknown sharing {sharing!r}; expected one of {SHARING_MODES}")
        if bn_inference not in ("population", "batch"):
            raise ValueError(f"bn_inference must be 'population' or 'batch', got {bn_inference!r}")
        self.task_names = tuple(task_names)
        self.num_tasks = len(task_names)
        self.sharing = sharing
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.bn_inference = bn_inference

    # ---- the layers
    def sfg_layers(self) -> Iterator[tuple[str, SFGConv]]:
        for name, m in self.named_modules():
            if isinstance(m, SFGConv):
                yield name, m

    # ---- training
    def regularizer(self) -> torch.Tensor:
        """``lambda1 * sum ||M||^2 - lambda2 * sum H(p)`` over SFG layers and kernels (eq. 5)."""
        layers = [m for _, m in self.sfg_layers()]
        norm = sum(m.kernel_norm() for m in layers)
        entropy = sum(m.groups.entropy() for m in layers)
        return self.lambda1 * norm - self.lambda2 * entropy

    def set_temperature(self, tau: float) -> None:
        """Gumbel-Softmax temperature of every SFG layer (a buffer: checkpoints keep it)."""
        if tau <= 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        for _, m in self.sfg_layers():
            m.groups.tau.fill_(tau)

    @property
    def temperature(self) -> float:
        return float(next(self.sfg_layers())[1].groups.tau)

    # ---- inference
    def set_inference(self, mode: str = "sample", per_example: bool | None = None) -> None:
        """How group assignments are drawn outside training: ``"sample"`` (posterior draws),
        ``"relaxed"`` (Gumbel-Softmax at the current temperature) or ``"argmax"``
        (deterministic); ``per_example`` draws one assignment per batch element."""
        if mode not in ("sample", "relaxed", "argmax"):
            raise ValueError(f"inference mode must be 'sample', 'relaxed' or 'argmax', got {mode!r}")
        for _, m in self.sfg_layers():
            m.groups.inference = mode
            if per_example is not None:
                m.groups.per_example = per_example

    def batch_statistics(self, enabled: bool | None = None):
        """Context: normalise with the statistics of the current batch without touching the running
        ones (A.4's test-time batch-norm); ``enabled`` defaults to ``bn_inference == "batch"``."""
        return batch_norm_statistics(self, self.bn_inference == "batch" if enabled is None else enabled)

    # ---- introspection
    def grouping_probabilities(self) -> dict[str, torch.Tensor]:
        """Layer name -> ``p`` of shape ``(kernels, T + 1)`` (detached, on CPU), for plotting."""
        return {name: m.groups.probabilities.detach().cpu() for name, m in self.sfg_layers()}

    def group_proportions(self) -> dict[str, list[float]]:
        """Layer name -> fraction of kernels whose most probable group is each of ``G_1..G_T, G_s``."""
        out = {}
        for name, p in self.grouping_probabilities().items():
            counts = torch.bincount(p.argmax(-1), minlength=self.num_tasks + 1).float()
            out[name] = (counts / counts.sum()).tolist()
        return out

    def mean_entropy(self) -> dict[str, float]:
        """Layer name -> mean entropy of the kernels' grouping probabilities (nats)."""
        return {name: float(torch.special.entr(p).sum(-1).mean()) for name, p in self.grouping_probabilities().items()}

    def architecture(self) -> dict:
        """The learned architecture: per SFG layer the argmax group of every kernel."""
        groups = [*self.task_names, "shared"]
        layers = []
        for name, p in self.grouping_probabilities().items():
            idx = p.argmax(-1)
            layers.append(
                {
                    "layer": name,
                    "kernels": int(p.shape[0]),
                    "assignment": idx.tolist(),
                    "proportions": dict(zip(groups, (torch.bincount(idx, minlength=len(groups)).float() / len(idx)).tolist())),
                    "mean_entropy": float(torch.special.entr(p).sum(-1).mean()),
                }
            )
        return {"network": type(self).__name__, "sharing": self.sharing, "groups": groups, "layers": layers}

    def export_architecture(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.architecture(), f, indent=2)
