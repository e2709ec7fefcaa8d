"""Backbones, each defined once as data (units and branch points), and task heads (networks are built from them by
:func:`mtl_med.build.build_network`)."""

from .blocks import Backbone, ConvUnit, LayerFactory, PoolUnit, Residual, Trunk
from .heads import HEADS, DenseHeads, PooledHeads
from .highresnet import highresnet
from .resnet import resnet18, resnet34
from .small_cnn import mnist_cnn
from .vgg import VGG_CFGS, vgg
from .backbones import BACKBONES, describe_backbone
