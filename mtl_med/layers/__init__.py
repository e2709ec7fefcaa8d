"""Building blocks of the sharing mechanisms, each for spatial_dims 2 and 3."""

from .cross_stitch import CrossStitch
from .gumbel import ExponentialTemperature, StepTemperature, gumbel_softmax, sample_gumbel
from .sfg import SHARING_MODES, SFGConv, StochasticFilterGroups, grouping_init
from .block_gate import BlockPolicy
from .task_routing import TaskRouting, TaskSampler, routing_masks, split_by_task
