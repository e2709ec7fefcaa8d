"""Task heads: what turns one task's features into its output. ``heads(features, k)`` is task ``k``'s
output; the heads never see another task's features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Pool
from torch import nn

from .blocks import layer_spec

__all__ = ["DenseHeads", "PooledHeads", "HEADS"]


def _counts(out_channels: Sequence[int]) -> list[int]:
    counts = [int(c) for c in out_channels]
    if not counts or min(counts) < 1:
        raise ValueError(f"heads need at least one task and at least one output per task, got out_channels {counts}")
    return counts


class DenseHeads(nn.ModuleList):
    """One 1x1 convolution with bias per task, at the features' resolution (SFG-HighResNet's heads:
    linear, so a regression head can output any value)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: Sequence[int]):
        super().__init__(Conv[Conv.CONV, spatial_dims](in_channels, c, 1, bias=True) for c in _counts(out_channels))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self[task](x)


class PooledHeads(nn.Module):
    """Average pooling, then per task optional hidden layers and a linear layer.

    The weights of all tasks live in batched ``(T, out, in)`` tensors (nn.Linear's initialisation,
    task by task), so hundreds of tasks (Task Routing's CelebA / CUB attributes) cost no module per
    task. Task ``k`` uses the first ``out_channels[k]`` rows.

    Args:
        spatial_dims: 2 or 3.
        in_channels: feature channels.
        out_channels: outputs of each task.
        hidden: width of each task's hidden layer (0: linear heads), or a sequence of widths, one per
            hidden layer (Selective Sharing's MNIST head: ``(640, 100, 50)``, section 4.2).
        act: activation after each hidden layer: a parameter-free MONAI ``Act`` or ``"prelu"`` (one
            slope per task and layer, as ``nn.PReLU()`` in each task's head; a shared one would tie the tasks).
        pooled_size: positions per spatial side kept by the pooling, flattened into the first layer: 1 is global
            average pooling; 4 on the MNIST CNN's 4 x 4 map of a 28 x 28 digit flattens its 640 features, as the
            Selective Sharing paper's FC 640 does (an identity pooling there).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: Sequence[int], hidden: int | Sequence[int] = 0,
                 act: str | tuple = "relu", pooled_size: int = 1):
        super().__init__()
        self.out_channels = _counts(out_channels)
        widths = [int(h) for h in (hidden if isinstance(hidden, Sequence) else [hidden]) if int(h)]
        if int(pooled_size) < 1 or any(h < 0 for h in widths):
            raise ValueError(f"pooled heads need pooled_size >= 1 and hidden widths >= 0, got {pooled_size} and {hidden}")
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](int(pooled_size))
        t, o = len(self.out_channels), max(self.out_channels)
        dims = [in_channels * int(pooled_size) ** spatial_dims, *widths, o]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(t, fan_out, fan_in)
            for k in range(t):
                nn.init.kaiming_uniform_(w[k], a=math.sqrt(5))
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(t, fan_out).uniform_(-bound, bound)))
        self.act, self.slopes = None, None
        if widths:
            name, args = layer_spec(act)
            if name.lower() == "prelu":
                self.slopes = nn.Parameter(torch.full((t, len(widths)), float(args.get("init", 0.25))))
            else:
                self.act = Act[name](**args)
                if any(True for _ in self.act.parameters()):
                    raise ValueError(f"the pooled heads' activation must be parameter-free or 'prelu', got {name!r}")

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1) if x.ndim > 2 else x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i:
                x = F.prelu(x, self.slopes[task, i - 1 : i]) if self.slopes is not None else self.act(x)
            x = F.linear(x, w[task], b[task])
        return x[:, : self.out_channels[task]]


HEADS = {"dense": DenseHeads, "pooled": PooledHeads}
