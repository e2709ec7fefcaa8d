"""Glue to MONAI / ignite engines: multi-task batches, losses and sharing-specific handlers."""

from .handlers import GroupingHandler, TemperatureHandler, simplex_image
from .multitask import MultiTaskEvaluator, MultiTaskPrepareBatch, MultiTaskTrainer, loss_terms, task_output
