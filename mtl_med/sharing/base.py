"""The interface every sharing method implements.

A method is an ``nn.Module`` built from a :class:`~mtl_med.networks.blocks.Backbone` (data), the
task names and the task heads. It says which backbones it cannot use and why (:meth:`refuse`),
computes each task's features (:meth:`task_features`) and brings whatever else it needs: a
regulariser added to the loss (:meth:`regularizer`), engine handlers for training
(:meth:`train_handlers`), extra checkpoint state (module buffers / extra state). The forward
pass, task selection and batch-norm mode are common to all and live here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from mtl_med.layers.tasks import as_task_index, split_by_task
from mtl_med.networks.blocks import Backbone
from mtl_med.networks.utils import batch_norm_statistics

__all__ = ["MultiTaskNetwork", "TaskContext"]


class TaskContext:
    """What the layers inside a trunk need to know about the current pass and cannot receive as an
    argument of ``forward(x)``: the task (an ``int`` or ``(B,)`` ids) and a method's per-pass values
    (AdaShare's gates). Shared by reference between the network and its layers; not state."""

    __slots__ = ("task", "gates")

    def __init__(self):
        self.task, self.gates = None, None


class MultiTaskNetwork(nn.Module):
    """Base class of the sharing methods. ``forward(x, task=None, generator=None)`` returns
    ``{task_name: output}``:

    - ``task=None``: every task;
    - an ``int`` or a name: that task only (one task per mini-batch, Task Routing's algorithm 1);
    - a ``(B,)`` ``LongTensor`` of per-example task ids: ``{name: outputs of that task's examples}``
      for the tasks present (group targets with :func:`mtl_med.layers.tasks.split_by_task`).

    ``generator`` drives the method's randomness (SFG's group draws, AdaShare's Gumbel noise).

    Args:
        backbone: the backbone's description.
        task_names: one unique name per task.
        heads: a heads module, ``heads(features, k)`` -> output of task ``k``.
        bn_inference: test-time batch-norm statistics: ``"population"`` (running averages) or
            ``"batch"`` (the test batch's, SFG paper A.4).
    """

    #: registry name (``mtl_med.sharing.METHODS``)
    name = ""
    #: the least number of tasks the method is defined for
    min_tasks = 1
    #: a forward pass may leave parameters out of the graph (DDP's ``find_unused_parameters``)
    may_skip_parameters = False

    def __init__(self, backbone: Backbone, task_names: Sequence[str], heads: nn.Module, bn_inference: str = "population"):
        super().__init__()
        self.task_names = [str(t) for t in task_names]
        if not self.task_names or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task_names must be non-empty and unique, got {self.task_names}")
        if len(self.task_names) < self.min_tasks:
            raise ValueError(f"{self.name} needs at least {self.min_tasks} tasks, got {len(self.task_names)}")
        reason = self.refuse(backbone)
        if reason:
            raise ValueError(f"sharing {self.name!r} cannot use backbone {backbone.name!r}: {reason}")
        if bn_inference not in ("population", "batch"):
            raise ValueError(f"bn_inference must be 'population' or 'batch', got {bn_inference!r}")
        self.num_tasks, self.spatial_dims, self.bn_inference = len(self.task_names), backbone.spatial_dims, bn_inference
        self.backbone_name = backbone.name
        self.heads = heads
        self.context = TaskContext()
        self.build_args: dict = {}  # set by build_network: how to build this network again
        self.builder = None  # set by build_network: the registry's function that builds it from build_args

    # --- what a method says about itself --------------------------------------------------------
    @classmethod
    def refuse(cls, backbone: Backbone) -> str | None:
        """Why this method cannot be built on ``backbone`` (its paper's precondition), or ``None``."""
        return None

    def task_features(self, x: torch.Tensor, task: int | torch.Tensor | None, generator: torch.Generator | None) -> list | torch.Tensor:
        """Features of every task (``task=None``: a list in task order), of task ``task`` (an
        ``int``), or per example (``(B,)`` ids: row ``b`` holds the features of task ``task[b]``)."""
        raise NotImplementedError

    def regularizer(self) -> torch.Tensor:
        """What the method adds to the loss (:class:`~mtl_med.losses.MultiTaskLoss` adds it); 0 here."""
        return self.heads_parameter().new_zeros(())

    def train_handlers(self, **kwargs) -> list:
        """MONAI / ignite handlers the method needs while training (none here)."""
        return []

    @contextlib.contextmanager
    def sampling_state(self, mode: str = "sample", per_example: bool | None = None):
        """Context: test-time draws as :meth:`set_inference` says, the previous settings restored
        afterwards (SFG); a deterministic method has nothing to set."""
        yield self

    def fast_sampler_unsupported(self, mode: str = "sample") -> str | None:
        """Why :meth:`fast_sampler` gives no engine (``None``: it gives one)."""
        return f"sharing {self.name!r} has no fast posterior sampler"

    def fast_sampler(self, mode: str = "sample", dtype: torch.dtype = torch.float32, channels_last: bool = False):
        """An exact faster engine for posterior passes (``engine(x, generator, copies=k)`` returning what
        ``network(x.repeat(k, ...), generator=generator)`` returns, drawing alike), or ``None``: the
        network's own forward runs (here: always)."""
        return None

    def plain_trunks(self) -> list | None:
        """The method's trunks when its features are nothing but plain trunks run on the input, one for
        every task or one per task (what receptive-field cropping can run layer by layer); ``None`` else."""
        return None

    def parameter_groups(self, lr: float, **options) -> list:
        """The optimiser's parameters, or groups of them with their own rates (SFG: its grouping
        logits at a scaled rate); ``options`` are the method's settings, ignored here: one group."""
        return list(self.parameters())

    def set_inference(self, mode: str = "sample", per_example: bool | None = None) -> None:
        """How a stochastic method draws at test time (SFG); a deterministic one has nothing to set."""

    def rebuild(self, **overrides) -> MultiTaskNetwork:
        """A fresh network built as this one was (:attr:`build_args`, by the registry's :attr:`builder`),
        with ``overrides`` of its arguments; newly initialised weights (e.g. AdaShare's re-training)."""
        if not self.build_args or self.builder is None:
            raise ValueError(f"{type(self).__name__} was not made by build_network: no build_args to rebuild it from")
        return self.builder(**{**self.build_args, **overrides})

    # --- common --------------------------------------------------------------------------------
    def heads_parameter(self) -> torch.Tensor:
        return next(self.heads.parameters())

    def batch_statistics(self, enabled: bool | None = None):
        """Context: normalise with the current batch's statistics, running ones untouched (SFG A.4);
        ``enabled`` defaults to ``bn_inference == "batch"``."""
        return batch_norm_statistics(self, self.bn_inference == "batch" if enabled is None else enabled)

    def forward(self, x: torch.Tensor, task: int | str | torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        with self.batch_statistics(enabled=not self.training and self.bn_inference == "batch"):
            if task is None:
                feats = self.task_features(x, None, generator)
                return {n: self.heads(f, k) for k, (n, f) in enumerate(zip(self.task_names, feats))}
            task = as_task_index(task, self.task_names)
            if isinstance(task, torch.Tensor):
                if task.shape != (x.shape[0],):
                    raise ValueError(f"per-example task ids must have shape ({x.shape[0]},), got {tuple(task.shape)}")
                task = task.to(x.device)
                rows = split_by_task(self.task_features(x, task, generator), task, self.task_names)
                return {n: self.heads(v, self.task_names.index(n)) for n, v in rows.items()}
            return {self.task_names[task]: self.heads(self.task_features(x, task, generator), task)}

    @contextlib.contextmanager
    def in_context(self, **values):
        """Set the context's ``task`` / ``gates`` for one pass of the trunk, cleared afterwards."""
        for k, v in values.items():
            setattr(self.context, k, v)
        try:
            yield
        finally:
            for k in values:
                setattr(self.context, k, None)

    @staticmethod
    def per_example(x: torch.Tensor, task: torch.Tensor, fn) -> torch.Tensor:
        """Row ``b`` of ``fn(x[rows of task k], k)`` for each task present: for methods whose
        tasks run apart (single-task columns)."""
        out = None
        for k in torch.unique(task).tolist():
            idx = (task == k).nonzero(as_tuple=True)[0]
            y = fn(x[idx], k)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out

    @staticmethod
    def rows_of(feats: Sequence[torch.Tensor], task: torch.Tensor) -> torch.Tensor:
        """Row ``b`` of ``feats[task[b]]``: per-example features from features of every task."""
        return torch.stack(list(feats))[task, torch.arange(task.shape[0], device=task.device)]
