"""Task selection, generic to every multi-task network: a task given by name, index or per-example ids
(:func:`as_task_index`), the rows of a batch grouped by task (:func:`split_by_task`), and the seeded
draw of the task of each mini-batch (:class:`TaskSampler`, Task Routing's algorithm 1, usable with any
method through the trainer's ``task_sampler``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

__all__ = ["as_task_index", "split_by_task", "TaskSampler"]


def as_task_index(task: int | str | torch.Tensor, task_names: Sequence[str]) -> int | torch.Tensor:
    """Normalise a task given by name, index or per-example id tensor; checks the range."""
    n = len(task_names)
    if isinstance(task, str):
        if task not in task_names:
            raise KeyError(f"unknown task {task!r}; tasks are {list(task_names)}")
        return list(task_names).index(task)
    if isinstance(task, torch.Tensor):
        if task.ndim == 0:
            task = int(task.item())
        else:
            if task.dtype.is_floating_point or task.dtype == torch.bool:
                raise TypeError(f"per-example task ids must be an integer tensor, got {task.dtype}")
            if task.numel() and (int(task.min()) < 0 or int(task.max()) >= n):
                raise IndexError(f"task ids must be in [0, {n}), got range [{int(task.min())}, {int(task.max())}]")
            return task.long()
    task = int(task)
    if not 0 <= task < n:
        raise IndexError(f"task index {task} out of range for {n} tasks")
    return task


class TaskSampler:
    """Draws the active task of each mini-batch (algorithm 1, line 3), from an explicit seed.

    ``sample()`` returns a task index; ``sample(batch_size)`` returns a ``LongTensor`` of
    per-example task ids (the "all tasks in one batch" option). Iterating yields one task index
    per mini-batch forever; ``zip(loader, sampler)`` pairs batches with tasks.

    Args:
        num_tasks: number of tasks.
        seed: seed of the private generator.
        weights: optional (unnormalised) sampling weights per task; uniform by default.
    """

    def __init__(self, num_tasks: int, seed: int = 0, weights: Sequence[float] | None = None):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = int(num_tasks)
        self.generator = torch.Generator().manual_seed(int(seed))
        w = torch.ones(self.num_tasks) if weights is None else torch.as_tensor(weights, dtype=torch.float)
        if w.shape != (self.num_tasks,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {num_tasks} non-negative numbers with a positive sum")
        self.weights = w

    def sample(self, batch_size: int | None = None) -> int | torch.Tensor:
        n = 1 if batch_size is None else int(batch_size)
        ids = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        return int(ids[0]) if batch_size is None else ids

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])


def split_by_task(
    values: torch.Tensor | Mapping[str, torch.Tensor],
    task_ids: torch.Tensor,
    task_names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Group the rows of a batch by their task id.

    ``values`` is a ``(B, ...)`` tensor (one output per example) or a mapping task name -> ``(B, ...)``
    targets; returns ``{task_name: rows whose id is that task}`` for every task present, in batch
    order. Used with per-example task ids so that outputs and targets line up for
    :class:`mtl_med.losses.MultiTaskLoss`.
    """
    out = {}
    ids = task_ids.long()
    for k in torch.unique(ids).tolist():
        name = task_names[k]
        sel = (ids == k).nonzero(as_tuple=True)[0]
        v = values[name] if isinstance(values, Mapping) else values
        out[name] = v[sel.to(v.device)]
    return out

