"""The backbones by name: :data:`BACKBONES` and :func:`describe_backbone` (each backbone's description as data).
Networks are built from them by the registry above this package and the sharing methods,
:func:`mtl_med.build.build_network`."""

from __future__ import annotations

from functools import partial

from .blocks import Backbone
from .highresnet import highresnet
from .resnet import resnet18, resnet34
from .small_cnn import mnist_cnn
from .vgg import vgg

__all__ = ["BACKBONES", "describe_backbone"]

#: name -> function returning the backbone's description (:class:`~mtl_med.networks.blocks.Backbone`)
BACKBONES = {
    "highresnet": highresnet,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg11": partial(vgg, 11, False),
    "vgg11_bn": partial(vgg, 11, True),
    "vgg16": partial(vgg, 16, False),
    "vgg16_bn": partial(vgg, 16, True),
    "mnist_cnn": mnist_cnn,
}


def describe_backbone(name: str, spatial_dims: int = 2, **kwargs) -> Backbone:
    """The description of backbone ``name`` (its units, branch points, layers)."""
    name = str(name).lower()
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](spatial_dims=spatial_dims, **kwargs)
