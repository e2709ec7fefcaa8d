"""Generic building blocks of the sharing mechanisms, each for spatial_dims 2 and 3 (a method's own layers
live in its package under :mod:`mtl_med.sharing`)."""

from .cross_stitch import CrossStitch
from .gumbel import ExponentialTemperature, StepTemperature, gumbel_softmax, sample_gumbel
from .tasks import TaskSampler, as_task_index, split_by_task
