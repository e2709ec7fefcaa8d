"""The registry: backbones (:data:`BACKBONES`), sharing methods (:data:`METHODS`) and ``build_network``, which puts
any method on any backbone with one head per task.

``build_network(backbone, sharing, task_names, out_channels)`` describes the backbone, makes the heads
(:data:`~mtl_med.networks.heads.HEADS`) and hands both to the sharing method, which refuses, with its paper's
reason, a backbone it cannot use. :func:`allowed_pairs` lists what builds. This module sits above both
``networks`` and ``sharing``: neither imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

from torch import nn

from mtl_med.networks.backbones import BACKBONES, describe_backbone
from mtl_med.networks.dense_heads import DENSE_HEADS
from mtl_med.networks.heads import HEADS
from mtl_med.sharing import METHODS

__all__ = ["BACKBONES", "METHODS", "build_network", "sfg_highresnet", "selective_mnist", "describe_backbone", "allowed_pairs"]


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _outs(out_channels, task_names: Sequence[str]) -> list[int]:
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
    head: str | None = None,
    head_hidden: int | None = None,
    head_act: str | tuple = "relu",
    head_pooled_size: int = 1,
    sharing_args: Mapping[str, Mapping] | None = None,
    **kwargs,
) -> nn.Module:
    """A multi-task network whose ``forward(x, task=None, generator=None)`` returns ``{task_name: output}``.

    Args:
        backbone: a name of :data:`BACKBONES`.
        sharing: a name of :data:`mtl_med.sharing.METHODS`.
        task_names: one name per task.
        out_channels: outputs per task (``int`` for all, a sequence, or a mapping name -> int).
        spatial_dims: 2 or 3.
        head: ``"dense"`` (1x1 convolutions at full resolution) or ``"pooled"`` (global average
            pooling and fully connected layers); default: dense for backbones that keep the
            input's resolution (HighResNet), pooled otherwise. ``"aspp"`` or ``"fcn"``: dense
            prediction heads upsampled to the input's size (:mod:`~mtl_med.networks.dense_heads`).
        head_hidden, head_act: the pooled heads' hidden width (default: the backbone's) and activation;
            ``head_hidden`` is also the ASPP / FCN heads' width. A sequence of widths gives the pooled heads
            one hidden layer each.
        head_pooled_size: positions per spatial side the pooled heads keep and flatten (1: global average
            pooling; 4 on the MNIST CNN: its 640 flattened features, Selective Sharing's head for every method).
        kwargs: the backbone's arguments (e.g. ``in_channels``, ``width``, ``features``,
            ``conv1_t_size``) and the method's (e.g. ``sigma`` and ``seed`` for routing,
            ``grouping``/``shared_init``/``lambda1`` for SFG, ``tau``/``policy`` for AdaShare,
            ``bn_inference`` for all).
        sharing_args: method name -> that method's arguments; only the entry of ``sharing`` is used (checked
            as ``kwargs`` are), so a config can hold the settings of several methods and build whichever
            ``sharing`` names (the pelvis bundle's SFG settings, ignored by ``--sharing hard_sharing``).
    """
    backbone, sharing = str(backbone).lower(), str(sharing).lower()
    if sharing not in METHODS:
        raise ValueError(f"unknown sharing {sharing!r}; expected one of {sorted(METHODS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    build_args = dict(backbone=backbone, sharing=sharing, task_names=list(task_names), out_channels=out_channels,
                      spatial_dims=spatial_dims, head=head, head_hidden=head_hidden, head_act=head_act,
                      head_pooled_size=head_pooled_size, **kwargs)
    if sharing_args:
        build_args["sharing_args"] = sharing_args
        names = {str(k).lower(): v for k, v in dict(sharing_args).items()}
        unknown_methods = sorted(set(names) - set(METHODS))
        if unknown_methods:
            raise ValueError(f"sharing_args names unknown sharing methods {unknown_methods}; expected names of {sorted(METHODS)}")
        own = dict(names.get(sharing) or {})
        twice = sorted(set(own) & set(kwargs))
        if twice:
            raise ValueError(f"build_network got {twice} both as arguments and in sharing_args[{sharing!r}]")
        kwargs = {**kwargs, **own}
    bb_keys = _parameters(BACKBONES[backbone]) - {"spatial_dims"}
    method = METHODS[sharing]
    method_keys = _parameters(method.__init__) - {"self", "backbone", "task_names", "heads"}
    unknown = sorted(set(kwargs) - bb_keys - method_keys)
    if unknown:
        raise ValueError(
            f"build_network({backbone!r}, {sharing!r}) got unknown arguments {unknown}; the backbone takes"
            f" {sorted(bb_keys)} and the method {sorted(method_keys)}"
        )
    spec = describe_backbone(backbone, spatial_dims, **{k: v for k, v in kwargs.items() if k in bb_keys})
    reason = method.refuse(spec)
    if reason:
        raise ValueError(f"sharing {sharing!r} cannot use backbone {backbone!r}: {reason}")
    task_names = [str(t) for t in task_names]
    outs = _outs(out_channels, task_names)
    head = head or ("dense" if spec.dense else "pooled")
    if head_pooled_size != 1 and head != "pooled":
        raise ValueError(f"head_pooled_size={head_pooled_size} applies to pooled heads only, not head {head!r}")
    if head == "dense":
        heads = HEADS["dense"](spatial_dims, spec.out_channels, outs)
    elif head == "pooled":
        hidden = spec.head_hidden if head_hidden is None else head_hidden
        heads = HEADS["pooled"](spatial_dims, spec.out_channels, outs, hidden=hidden, act=head_act, pooled_size=head_pooled_size)
    elif head in DENSE_HEADS:  # upsampled to the input's size (dense_heads.py)
        heads = DENSE_HEADS[head](spatial_dims, spec.out_channels, outs, **({} if head_hidden is None else {"hidden": int(head_hidden)}))
    else:
        raise ValueError(f"head must be one of {sorted(HEADS) + sorted(DENSE_HEADS)}, got {head!r}")
    net = method(spec, task_names, heads, **{k: v for k, v in kwargs.items() if k in method_keys})
    if hasattr(net.heads, "attach"):  # the network's own heads (a method may rebuild them)
        net.heads.attach(net)
    net.build_args = build_args
    net.builder = build_network  # net.rebuild(): a method builds itself again without importing the registry
    return net


def sfg_highresnet(task_names: Sequence[str] = ("sct", "seg"), out_channels=(1, 6), spatial_dims: int = 2, in_channels: int = 1, **kwargs) -> nn.Module:
    """SFG-HighResNet (SFG paper, section 4.1 and appendix B): ``build_network("highresnet", "sfg", ...)``
    with the pelvis tasks' defaults, synthetic CT (1 channel) and 6-class labels."""
    return build_network("highresnet", "sfg", task_names, out_channels, spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)


def selective_mnist(task_names: Sequence[str] = tuple(f"digit_{k}" for k in range(10)), out_channels=2, in_channels: int = 1, **kwargs) -> nn.Module:
    """Selective Sharing's MNIST network (section 4.2, fig. 7): two 5x5 convolutions of 20 and 40 channels with
    batch-norm and max pooling; the 40 x 4 x 4 = 640 features of a 28 x 28 digit, flattened, into
    the hard-shared FC layer of 640 units ("as a feature cutoff point, we apply a 640 unit fully
    connected layer"; the PyTorch MNIST example it cites flattens into its first FC layer); per task
    a branch FC 100 -> FC 50 and the output layer. Ten one-vs-all tasks by default."""
    kwargs = {"shared_width": 640, "branch_widths": (100, 50), "pooled_size": 4, **kwargs}
    return build_network("mnist_cnn", "selective", list(task_names), out_channels, spatial_dims=2, in_channels=in_channels, **kwargs)


def allowed_pairs(spatial_dims: int = 2) -> dict[tuple[str, str], str | None]:
    """``(backbone, sharing)`` -> ``None`` where the pair builds, else the reason it is refused."""
    out = {}
    for b in BACKBONES:
        spec = describe_backbone(b, spatial_dims)
        for s, m in METHODS.items():
            out[(b, s)] = m.refuse(spec)
    return out
