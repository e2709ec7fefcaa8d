"""Sharing methods, each one module behind one interface (:class:`~mtl_med.sharing.base.MultiTaskNetwork`).

``METHODS`` maps a name to its class; :func:`mtl_med.build.build_network` puts any of them on
any backbone whose structure its paper needs. A new method is one class (a
:class:`~mtl_med.sharing.base.MultiTaskNetwork` with a ``name``) and :func:`register`.
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
METHODS: dict[str, type[MultiTaskNetwork]] = {}


def register(cls: type[MultiTaskNetwork], replace: bool = False) -> type[MultiTaskNetwork]:
    """Add a sharing method to :data:`METHODS` under ``cls.name`` (usable as a class decorator); the
    bundles and :func:`mtl_med.build.build_network` then build it by that name. ``replace`` allows
    a name already taken."""
    if not (isinstance(cls, type) and issubclass(cls, MultiTaskNetwork)):
        raise TypeError(f"a sharing method must be a MultiTaskNetwork subclass, got {cls!r}")
    name = str(cls.name)
    if not name or name != name.lower():
        raise ValueError(f"a sharing method needs a lower-case name, got {cls.name!r} for {cls.__name__}")
    if name in METHODS and METHODS[name] is not cls and not replace:
        raise ValueError(f"sharing method {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls
    return cls


for _m in (HardSharing, SingleTask, CrossStitch, TaskRouting, SFG, AdaShare, Branched, SelectiveSharing):
    register(_m)
del _m
