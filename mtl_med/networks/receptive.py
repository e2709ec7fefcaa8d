"""Receptive-field geometry of stride-1 "same" convolutions: compute each layer only where it is needed.

A posterior pass over a margin-padded slice keeps only the central outputs (the pelvis job: a 288 x 288 slice,
33 voxels of replicate margin, 354 x 354 computed). An output at crop ``c`` (``c`` voxels in from every side
of the frame) depends on the previous layer at crop ``c - r``, ``r = dilation * (kernel - 1) / 2`` the
convolution's radius, so walking the network backwards from the output every layer has a crop of its own,
``max(0, C - R)`` with ``C`` the output's crop and ``R`` the radii of the convolutions after it on the longest
path to the output. Each convolution then reads its input at crop ``want - r``: a slice of what the previous
layer computed where that is ``>= 0``; where it is negative the region runs past the frame's edge and is
zero-padded, exactly where the full pass pads. The result equals the full pass on the frame, cropped (the
elementwise layers between convolutions -- eval batch-norm, PReLU -- do not mix positions; a residual
addition crops its skip to the residual's region).

Regions are centred (the same crop on both sides of every spatial dim), so a tensor's crop follows from its
shape and the frame's: :func:`crop_of`. :class:`CropPlan` holds each convolution's ``R`` (keyed by module) and
runs it (:meth:`CropPlan.conv`); :func:`plan_trunk` / :func:`cropped_forward` do it for the plain trunks
(hard sharing, single-task columns) of HighResNet-like backbones. SFG's passes have theirs in
:mod:`mtl_med.sharing.sfg.compact`. :func:`conv_macs` / :func:`chain_macs` count the multiply-accumulates
of a convolution / a chain for a given input frame and output crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import HighResBlock, Trunk
from .heads import DenseHeads
from .utils import unwrap

__all__ = [
    "conv_radius",
    "crop_of",
    "take",
    "CropPlan",
    "conv_macs",
    "chain_macs",
    "plan_trunk",
    "crop_unsupported",
    "cropped_forward",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def conv_radius(conv: nn.Module) -> tuple[int, ...]:
    """Per spatial dim, how far (voxels) a stride-1 "same" zero-padded convolution reaches from an output;
    ``ValueError`` for any other convolution (strided, unpadded, asymmetric, other padding modes)."""
    n = conv.weight.ndim - 2
    k, d, p, s = (_tuple(getattr(conv, a), n) for a in ("kernel_size", "dilation", "padding", "stride"))
    r = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    if set(s) != {1} or p != r or any(ki % 2 == 0 for ki in k) or getattr(conv, "padding_mode", "zeros") != "zeros" or getattr(conv, "groups", 1) != 1:
        raise ValueError(f"receptive-field cropping needs stride-1 'same' zero-padded convolutions, got {conv}")
    return r


def crop_of(frame: Sequence[int], x: torch.Tensor) -> tuple[int, ...]:
    """The crop of a centred region tensor ``x`` (``B, C, *spatial``) in a frame of spatial size ``frame``."""
    diff = [int(f) - int(s) for f, s in zip(frame, x.shape[2:])]
    if any(v < 0 or v % 2 for v in diff):
        raise ValueError(f"a {tuple(x.shape[2:])} region is not centred in a {tuple(frame)} frame")
    return tuple(v // 2 for v in diff)


def take(x: torch.Tensor, frame: Sequence[int], want: Sequence[int]) -> torch.Tensor:
    """``x`` (a centred region of ``frame``) cropped to crop ``want`` (at least its own crop, per dim)."""
    have = crop_of(frame, x)
    cut = [w - h for w, h in zip(want, have)]
    if any(c < 0 for c in cut):
        raise ValueError(f"cannot widen a region at crop {have} to crop {tuple(want)}")
    if not any(cut):
        return x
    return x[(slice(None), slice(None), *(slice(c, x.shape[2 + i] - c) for i, c in enumerate(cut)))]


def conv_macs(out_shape: Sequence[int], in_channels: int, out_channels: int, kernel: Sequence[int], batch: int = 1) -> int:
    """Multiply-accumulates of a (dense, groups=1) convolution producing ``out_shape`` spatial outputs."""
    return int(batch) * int(in_channels) * int(out_channels) * math.prod(int(k) for k in kernel) * math.prod(int(s) for s in out_shape)


def chain_macs(layers: Sequence[tuple], frame: Sequence[int], crop: Sequence[int] | int = 0) -> int:
    """MACs of a chain of stride-1 "same" convolutions ``(in_channels, out_channels, kernel, dilation[, count])``
    (in order along the longest path; ``count`` copies of a layer, e.g. one per stream, cost ``count`` times) on a
    frame of spatial size ``frame`` when only the outputs at ``crop`` are kept (``0``: the full pass)."""
    n = len(frame)
    crop = _tuple(crop, n)
    radii = [tuple(d * (k - 1) // 2 for k, d in zip(_tuple(layer[2], n), _tuple(layer[3], n))) for layer in layers]
    total, after = 0, [0] * n
    for layer, r in zip(reversed(layers), reversed(radii)):
        want = [max(0, c - a) for c, a in zip(crop, after)]
        out = [f - 2 * w for f, w in zip(frame, want)]
        total += conv_macs(out, layer[0], layer[1], _tuple(layer[2], n), layer[4] if len(layer) > 4 else 1)
        after = [a + ri for a, ri in zip(after, r)]
    return total


class CropPlan:
    """Each convolution's region: ``after[conv]``, the radii of the convolutions after it on the longest path
    to the output, per spatial dim; :meth:`conv` runs a convolution on just its region.

    Args:
        crop: the output's crop, per spatial dim (or one int).
        spatial_dims: 1, 2 or 3.
    """

    def __init__(self, crop: Sequence[int] | int, spatial_dims: int):
        self.n = int(spatial_dims)
        self.crop = _tuple(crop, self.n)
        self.after: dict[int, tuple[int, ...]] = {}
        self.radius: tuple[int, ...] = (0,) * self.n  # the longest path's, once planned
        self.macs = 0  # counted by :meth:`conv` since the last reset

    def add(self, conv: nn.Module, after: Sequence[int]) -> tuple[int, ...]:
        """Record ``conv`` with ``after`` behind it; returns ``after`` plus its radius (what precedes it has)."""
        self.after[id(conv)] = tuple(after)
        out = tuple(a + r for a, r in zip(after, conv_radius(conv)))
        self.radius = tuple(max(a, b) for a, b in zip(self.radius, out))
        return out

    def want(self, conv: nn.Module) -> tuple[int, ...]:
        """The crop of ``conv``'s output."""
        return tuple(max(0, c - a) for c, a in zip(self.crop, self.after[id(conv)]))

    def padding(self, x: torch.Tensor, frame: Sequence[int], conv: nn.Module) -> tuple[int, ...]:
        """The zeros :meth:`conv` pads ``x`` with (per spatial dim, each side): nonzero only at the frame's edge."""
        return tuple(max(0, r - w) for w, r in zip(self.want(conv), conv_radius(conv)))

    def conv(self, x: torch.Tensor, frame: Sequence[int], conv: nn.Module, weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, fn=None) -> torch.Tensor:
        """``conv`` (its geometry; ``weight`` / ``bias`` / ``fn`` replace its own) on the region of input ``x``
        it needs, zero-padded only beyond the frame."""
        weight = conv.weight if weight is None else weight
        fn = fn or _CONV[self.n]
        have, want, r = crop_of(frame, x), self.want(conv), conv_radius(conv)
        need = [w - ri for w, ri in zip(want, r)]
        if any(nd < h and h > 0 for nd, h in zip(need, have)):
            raise ValueError(f"{conv}: input at crop {have} cannot give outputs at crop {want}")
        x = take(x, frame, [max(nd, h) for nd, h in zip(need, have)])
        pad = tuple(max(0, -nd) for nd in need)
        y = fn(x, weight, bias, 1, pad, _tuple(conv.dilation, self.n))
        self.macs += conv_macs(y.shape[2:], weight.shape[1], weight.shape[0], weight.shape[2:], y.shape[0])
        return y

    def module(self, conv: nn.Module, x: torch.Tensor, frame: Sequence[int]) -> torch.Tensor:
        """``conv(x)`` on its region (the module's own weight and bias)."""
        return self.conv(x, frame, conv, conv.weight, conv.bias)


def _elementwise(m: nn.Module) -> bool:
    if isinstance(m, _BatchNorm):
        return not m.training and m.track_running_stats and m.running_mean is not None
    return isinstance(m, (nn.Identity, nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.Dropout)) and not m.training


def _unit_ok(u: nn.Module) -> str | None:
    if type(u) is HighResBlock:
        parts, convs = (u.norm1, u.act1, u.norm2, u.act2), (u.conv1, u.conv2)
    elif isinstance(u, nn.Sequential) and len(u) == 3 and isinstance(u[0], nn.modules.conv._ConvNd):
        parts, convs = (u[1], u[2]), (u[0],)
    else:
        return f"unit {type(u).__name__} is neither a convolution unit nor a HighResNet block"
    if not all(_elementwise(p) for p in parts):
        return "a normalisation or activation between convolutions is not elementwise (training mode, batch statistics?)"
    return convs_unsupported(convs)


def convs_unsupported(convs) -> str | None:
    """Why these convolutions cannot run on regions (strided, unpadded: :func:`conv_radius` refuses), or ``None``."""
    try:
        for c in convs:
            conv_radius(c)
    except ValueError as e:
        return str(e)
    return None


def plan_trunk(trunk: Trunk, plan: CropPlan, after: Sequence[int] | None = None) -> tuple[int, ...]:
    """Add a trunk's convolutions to ``plan`` (``after``: behind its output, default none); returns its input's."""
    after = tuple(after) if after is not None else (0,) * plan.n
    for u in reversed(list(trunk.units)):
        if isinstance(u, HighResBlock):
            after = plan.add(u.conv1, plan.add(u.conv2, after))
        else:
            after = plan.add(u[0], after)
    return after


def run_trunk(trunk: Trunk, x: torch.Tensor, frame: Sequence[int], plan: CropPlan) -> torch.Tensor:
    """A planned trunk's output on its region."""
    for u in trunk.units:
        if isinstance(u, HighResBlock):
            h = plan.module(u.conv1, u.act1(u.norm1(x)), frame)
            r = plan.module(u.conv2, u.act2(u.norm2(h)), frame)
            x = u.combine(r, take(u.shortcut(x), frame, crop_of(frame, r)))
        else:
            x = u[2](u[1](plan.module(u[0], x, frame)))
    return x


def _trunks(net: nn.Module) -> list[Trunk] | None:
    hook = getattr(net, "plain_trunks", None)  # a sharing method's hook (mtl_med.sharing.base)
    trunks = hook() if callable(hook) else None
    return list(trunks) if trunks and all(isinstance(t, Trunk) for t in trunks) else None


def crop_unsupported(network: nn.Module) -> str | None:
    """Why :func:`cropped_forward` cannot run ``network`` (then run it whole and crop), or ``None``."""
    net = unwrap(network)
    trunks = _trunks(net)
    if trunks is None:
        return f"{type(net).__name__} has no plain trunks (its plain_trunks() gives none)"
    if net.training or getattr(net, "bn_inference", "population") == "batch":
        return "the network is training or normalises with test-batch statistics"
    if net._forward_pre_hooks or net._forward_hooks:
        return "the network has forward hooks"
    if not isinstance(getattr(net, "heads", None), DenseHeads):
        return "its heads are not 1x1 dense heads"
    for t in trunks:
        for u in t.units:
            reason = _unit_ok(u)
            if reason:
                return reason
    return None


@torch.no_grad()
def cropped_forward(network: nn.Module, x: torch.Tensor, crop: Sequence[int] | int, plan: CropPlan | None = None) -> dict[str, torch.Tensor]:
    """``network(x)`` cropped by ``crop`` on every spatial side, each layer computed only on its region
    (equal to the full pass to float rounding). For hard-sharing and single-task HighResNet-like networks
    (:func:`crop_unsupported`); ``plan`` (optional) counts the MACs in ``plan.macs``."""
    reason = crop_unsupported(network)
    if reason:
        raise ValueError(f"receptive-field cropping cannot run this network: {reason}")
    net = unwrap(network)
    frame = tuple(x.shape[2:])
    plan = plan or CropPlan(crop, x.ndim - 2)
    trunks = _trunks(net)
    for t in trunks:
        plan_trunk(t, plan)
    feats = [run_trunk(t, x, frame, plan) for t in trunks]
    feats = feats * net.num_tasks if len(feats) == 1 else feats
    out = {}
    for k, (name, f) in enumerate(zip(net.task_names, feats)):
        out[name] = take(net.heads(f, k), frame, plan.crop)
    return out
