"""Glue to MONAI / ignite engines: multi-task batches, losses and sharing-specific handlers."""

from .handlers import ExampleSlicesHandler, GroupingHandler, TemperatureHandler, rank_zero_first, simplex_image
from .multitask import MultiTaskEvaluator, MultiTaskPrepareBatch, MultiTaskTrainer, grouping_param_groups, loss_terms, task_output
from .vision import MultiTaskReport, MultiTaskScore, PredictionWriter, RegressionLoss, load_baseline, task_losses, task_out_channels
from .adashare import AdaShareSearch, PolicyImageHandler
from .branched import BranchedSearch
from .selective import SelectiveSharingHandler
