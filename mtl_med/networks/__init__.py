"""Whole networks assembled from the layers: one backbone, pluggable sharing."""

from .highresnet import SFGHighResNet
from .sfg import SFGNetwork
from .vgg import VGG_CFGS, SFGVGG
