"""Whole networks assembled from the layers: one backbone, pluggable sharing."""

from .highresnet import SFGHighResNet
from .sfg import SFGNetwork
from .vgg import VGG_CFGS, SFGVGG
from .resnet import ResNet, TaskHeads, resnet18, resnet34
from .vgg import TaskRoutingVGG
from .adashare_highresnet import AdaShareHighResNet
from .factory import build_network
