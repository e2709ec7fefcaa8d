"""mtl_med.sharing"""

from . import adashare
