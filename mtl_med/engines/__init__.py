"""Glue to MONAI / ignite engines: multi-task batches, losses and handlers. Generic: what a sharing
method needs in training it brings itself (its ``train_handlers``, ``parameter_groups``, ``regularizer``)."""

from .handlers import ExampleSlicesHandler, rank_zero_first
from .multitask import MultiTaskEvaluator, MultiTaskPrepareBatch, MultiTaskTrainer, loss_terms, parameter_groups, task_output
from .vision import MultiTaskReport, MultiTaskScore, PredictionWriter, RegressionLoss, load_baseline, task_losses, task_out_channels
