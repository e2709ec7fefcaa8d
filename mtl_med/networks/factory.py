"""One way to build a multi-task network: backbone + sharing mechanism + one head per task.

``build_network(backbone, sharing, task_names, out_channels)`` maps a (backbone, sharing) pair to
the class that implements it; the loss is always :class:`mtl_med.losses.MultiTaskLoss`.

============  =====================================================  ==========================
backbone      sharing                                                class
============  =====================================================  ==========================
vgg11, vgg16  sfg, single_task, hard_sharing, constant_mask,         :class:`SFGVGG`
              constant_p, cross_stitch (the SFG paper's baselines)
vgg11, vgg16  routing                                                :class:`TaskRoutingVGG`
resnet18/34   hard_sharing, routing, adashare, cross_stitch          :class:`ResNet`
highresnet    sfg, single_task, hard_sharing, constant_mask,         :class:`SFGHighResNet`
              constant_p, cross_stitch
highresnet    adashare                                               :class:`AdaShareHighResNet`
============  =====================================================  ==========================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..layers.sfg import SHARING_MODES as SFG_MODES
from .adashare_highresnet import AdaShareHighResNet
from .highresnet import SFGHighResNet
from .resnet import ResNet
from .vgg import SFGVGG, TaskRoutingVGG

__all__ = ["BACKBONES", "SHARINGS", "SUPPORTED", "build_network"]

BACKBONES = ("vgg11", "vgg16", "resnet18", "resnet34", "highresnet")
SHARINGS = (*SFG_MODES, "routing", "adashare")
_RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_RESNET_SHARING = {"hard_sharing": "hard", "routing": "routing", "adashare": "adashare", "cross_stitch": "cross_stitch"}
#: backbone -> the sharing methods it supports
SUPPORTED = {
    "vgg11": (*SFG_MODES, "routing"),
    "vgg16": (*SFG_MODES, "routing"),
    "resnet18": tuple(_RESNET_SHARING),
    "resnet34": tuple(_RESNET_SHARING),
    "highresnet": (*SFG_MODES, "adashare"),
}


def _outs(out_channels: int | Sequence[int] | Mapping[str, int], task_names: Sequence[str]) -> list[int]:
    if isinstance(out_channels, int):
        return [out_channels] * len(task_names)
    if isinstance(out_channels, Mapping):
        missing = [t for t in task_names if t not in out_channels]
        if missing:
            raise ValueError(f"out_channels has no entry for tasks {missing}")
        return [int(out_channels[t]) for t in task_names]
    outs = [int(c) for c in out_channels]
    if len(outs) != len(task_names):
        raise ValueError(f"out_channels has {len(outs)} entries for {len(task_names)} tasks")
    return outs


def build_network(
    backbone: str,
    sharing: str,
    task_names: Sequence[str],
    out_channels: int | Sequence[int] | Mapping[str, int],
    spatial_dims: int = 2,
    in_channels: int = 3,
    width: float = 1.0,
    **kwargs,
) -> nn.Module:
    """A multi-task network whose ``forward`` returns ``{task_name: output}``.

    Args:
        backbone: one of :data:`BACKBONES`.
        sharing: one of :data:`SHARINGS`; see :data:`SUPPORTED` for the valid pairs.
        task_names: one name per task.
        out_channels: outputs per task (``int`` for all, a sequence, or a mapping name -> int).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        width: multiplier of the backbone's published widths (VGG 64..512, ResNet 64..512,
            HighResNet 16, 32, 64); a small value makes a network cheap on CPU.
        kwargs: passed to the class, e.g. ``sigma`` and ``seed`` for routing, ``shared_init`` and
            ``lambda1`` for SFG, ``tau`` and ``lambda_sparsity`` for AdaShare,
            ``conv1_t_size``/``no_max_pool`` for ResNet stems on small images.
    """
    backbone, sharing = str(backbone).lower(), str(sharing).lower()
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    if sharing not in SHARINGS:
        raise ValueError(f"unknown sharing {sharing!r}; expected one of {SHARINGS}")
    if sharing not in SUPPORTED[backbone]:
        raise ValueError(
            f"sharing {sharing!r} is not available for backbone {backbone!r}; it supports {SUPPORTED[backbone]}"
            f" (backbones with {sharing!r}: {[b for b, s in SUPPORTED.items() if sharing in s]})"
        )
    if not float(width) > 0:
        raise ValueError(f"width must be > 0, got {width}")
    task_names = [str(t) for t in task_names]
    outs = _outs(out_channels, task_names)
    common = dict(spatial_dims=spatial_dims, in_channels=in_channels, task_names=task_names)
    if backbone.startswith("vgg"):
        depth = int(backbone[3:])
        if sharing == "routing":
            return TaskRoutingVGG(out_channels=outs, depth=depth, width=width, **common, **kwargs)
        return SFGVGG(out_channels=outs, depth=depth, width=width, sharing=sharing, **common, **kwargs)
    if backbone.startswith("resnet"):
        widths = kwargs.pop("widths", None) or [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        return ResNet(
            out_channels=outs, layers=_RESNET_LAYERS[backbone], widths=widths, sharing=_RESNET_SHARING[sharing], **common, **kwargs
        )
    features = kwargs.pop("features", None) or [max(1, round(w * width)) for w in (16, 32, 64)]
    if sharing == "adashare":
        return AdaShareHighResNet(out_channels=outs, features=features, **common, **kwargs)
    return SFGHighResNet(out_channels=outs, features=features, sharing=sharing, **common, **kwargs)
