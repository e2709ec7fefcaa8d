"""VGG backbones. SFG-VGG11 of the SFG paper (section 4.1), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Pool
from torch import nn

from ..layers.sfg import SFGConv
from .sfg import SFGNetwork

__all__ = ["VGG_CFGS", "SFGVGG"]

# Simonyan & Zisserman, configurations A (VGG-11) and D (VGG-16): widths, "M" = 2x max pooling.
VGG_CFGS: dict[int, tuple] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def vgg_layers(depth: int, width: float = 1.0) -> list:
    """The layer list of VGG-``depth`` with widths scaled by ``width`` (at least 1 channel)."""
    if depth not in VGG_CFGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
    return [v if v == "M" else max(1, round(v * width)) for v in VGG_CFGS[depth]]


class SFGVGG(SFGNetwork):
    """VGG with every convolution an SFG layer (SFG-VGG11 for the UTKFace experiments).

    Max pooling is applied to each stream ``F_1..F_T, F_s``; the final max pooling and the fully
    connected layers of VGG are replaced by global average pooling of each stream, the merge
    ``F_t + F_s`` and two fully connected layers per task (section 4.1).

    Args:
        out_channels: outputs of each task, e.g. ``(1, 2)``: age regression, gender logits.
        task_names: e.g. ``("age", "gender")``.
        depth: 11 or 16.
        width: multiplier of the VGG widths (1.0 is the published network).
        head_hidden: width of each task's first fully connected layer (default: the last
            convolution's width).
        sharing, shared_init, hard, noise, per_example, lambda1, lambda2, bn_inference: see
            :class:`~mtl_med.networks.highresnet.SFGHighResNet`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: Sequence[int] = (1, 2),
        task_names: Sequence[str] = ("age", "gender"),
        depth: int = 11,
        width: float = 1.0,
        head_hidden: int | None = None,
        sharing: str = "sfg",
        shared_init: float = 0.6,
        hard: bool = True,
        noise: str = "log_p",
        per_example: bool = False,
        lambda1: float = 1e-6,
        lambda2: float = 1e-5,
        bn_inference: str = "population",
        act: str | tuple = "prelu",
    ):
        super().__init__(task_names, sharing, lambda1, lambda2, bn_inference)
        if len(out_channels) != self.num_tasks:
            raise ValueError(f"{len(task_names)} task names but {len(out_channels)} head widths")
        self.spatial_dims = spatial_dims
        cfg = vgg_layers(depth, width)[:-1]  # the last pooling becomes global average pooling
        sfg = dict(num_tasks=self.num_tasks, mode=sharing, shared_init=shared_init, hard=hard, noise=noise, per_example=per_example, act=act)
        self.layers = nn.ModuleList()
        c = in_channels
        for v in cfg:
            if v == "M":
                self.layers.append(Pool[Pool.MAX, spatial_dims](2))
            else:
                self.layers.append(SFGConv(spatial_dims, c, v, first=not self.layers, merge="sum", **sfg))
                c = v
        self.gap = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        hidden = head_hidden or c
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, hidden), nn.PReLU(), nn.Linear(hidden, k)) for k in out_channels
        )

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        with self.batch_statistics(enabled=not self.training and self.bn_inference == "batch"):
            feats = x
            for layer in self.layers:
                feats = layer(feats, generator) if isinstance(layer, SFGConv) else [layer(f) for f in feats]
        pooled = [self.gap(f).flatten(1) for f in feats]
        shared = pooled[self.num_tasks]
        return {name: head(pooled[t] + shared) for t, (name, head) in enumerate(zip(self.task_names, self.heads))}


# --- Task Routing VGG (Strezoski et al., ICCV 2019) ---------------------------------------------

from ..layers.task_routing import TaskRouting  # noqa: E402
from .resnet import TaskHeads, multitask_outputs  # noqa: E402

__all__.append("TaskRoutingVGG")


class TaskRoutingVGG(nn.Module):
    """VGG-11/16 with batch-norm and a Task Routing Layer after every convolution + batch-norm
    (Task Routing, sections 3.2 and 4.3: VGG-16 for CIFAR-10/CelebA, VGG-11 for CUB).

    Each convolution is ``conv 3x3 -> BN -> TRL -> act``; the max poolings of ``VGG_CFGS`` use
    ``ceil_mode`` (small inputs keep a 1x1 map), then global average pooling and one head per task
    (an own embedding of ``head_hidden`` units per task, section 3.3) as batched weights, so
    hundreds of tasks share one backbone.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        task_names: one name per task.
        out_channels: outputs per task (``int`` for all, or a sequence).
        depth: 11 or 16.
        width: multiplier of the VGG widths.
        sigma: sharing ratio, fraction of units shared by all tasks (1 = hard sharing, 0 = one
            subnetwork per task; see :mod:`mtl_med.layers.task_routing`).
        seed: seed of the routing masks.
        act: activation (MONAI ``Act`` name), e.g. ``"relu"``.
        head_hidden: width of each task's hidden layer (default: the last convolution's width;
            0 for linear heads).

    ``forward(x, task=None)`` as :class:`mtl_med.networks.resnet.ResNet`: all tasks, one task
    (``int`` or name) or per-example task ids.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        task_names: Sequence[str] = tuple(f"task_{k}" for k in range(10)),
        out_channels: int | Sequence[int] = 1,
        depth: int = 16,
        width: float = 1.0,
        sigma: float = 0.5,
        seed: int = 0,
        act: str = "relu",
        head_hidden: int | None = None,
    ):
        super().__init__()
        from monai.networks.layers.factories import Act, Conv, Norm

        self.task_names = [str(t) for t in task_names]
        self.num_tasks = len(self.task_names)
        outs = [int(out_channels)] * self.num_tasks if isinstance(out_channels, int) else [int(c) for c in out_channels]
        if len(outs) != self.num_tasks:
            raise ValueError(f"{self.num_tasks} task names but {len(outs)} output sizes")
        g = torch.Generator().manual_seed(int(seed))
        self.layers = nn.ModuleList()
        c = in_channels
        for v in vgg_layers(depth, width):
            if v == "M":
                self.layers.append(Pool[Pool.MAX, spatial_dims](kernel_size=2, ceil_mode=True))
                continue
            self.layers.append(
                nn.ModuleDict(
                    {
                        "conv": Conv[Conv.CONV, spatial_dims](c, v, 3, padding=1, bias=False),
                        "norm": Norm[Norm.BATCH, spatial_dims](v),
                        "route": TaskRouting(v, self.num_tasks, sigma, generator=g),
                        "act": Act[act](),
                    }
                )
            )
            c = v
        self.gap = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.heads = TaskHeads(c, outs, hidden=c if head_hidden is None else head_hidden, act=act)

    def features(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, nn.ModuleDict):
                x = layer["act"](layer["route"](layer["norm"](layer["conv"](x)), task))
            else:
                x = layer(x)
        return self.gap(x).flatten(1)

    def forward(self, x: torch.Tensor, task: int | str | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return multitask_outputs(x, task, self.task_names, self.heads, self.features, task_specific=True)

    def regularizer(self) -> torch.Tensor:
        """Task routing has no regulariser: 0."""
        return self.heads.weights[0].new_zeros(())
