"""Sharing methods, each one module behind one interface (:class:`~mtl_med.sharing.base.MultiTaskNetwork`).

``METHODS`` maps a name to its class; :func:`mtl_med.build.build_network` puts any of them on
any backbone whose structure its paper needs.
"""

from .base import MultiTaskNetwork, TaskContext
from .hard import HardSharing
from .single_task import SingleTask
from .cross_stitch import CrossStitch
from .routing import TaskRouting
from .sfg import SFG
from .adashare import AdaShare
from .branched import Branched
from .selective import SelectiveSharing
from . import adashare, branched

#: name -> sharing method
METHODS = {m.name: m for m in (HardSharing, SingleTask, CrossStitch, TaskRouting, SFG, AdaShare, Branched, SelectiveSharing)}
