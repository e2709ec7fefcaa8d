"""Stochastic Filter Groups (Bragman et al., ICCV 2019): everything only about SFG.

- :mod:`.network`: :class:`SFG`, the sharing method (``build_network(..., "sfg")``), and its groupings;
- :mod:`.handlers`: temperature annealing and the TensorBoard views of the grouping.
"""

from .handlers import GroupingHandler, TemperatureHandler, simplex_image
from .network import GROUPINGS, SFG

__all__ = ["SFG", "GROUPINGS", "TemperatureHandler", "GroupingHandler", "simplex_image"]
