"""Backbones, each defined once as data (units and branch points), task heads, and ``build_network``."""

from .blocks import Backbone, ConvUnit, LayerFactory, PoolUnit, Residual, Trunk
from .heads import HEADS, DenseHeads, PooledHeads
from .highresnet import highresnet
from .resnet import resnet18, resnet34
from .small_cnn import mnist_cnn
from .vgg import VGG_CFGS, vgg
from .build import BACKBONES, allowed_pairs, build_network, describe_backbone, sfg_highresnet
