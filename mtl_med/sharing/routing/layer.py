"""Task Routing (Strezoski et al., ICCV 2019): fixed random per-task channel masks.

Sharing-ratio convention (the paper's, sections 3 and 4.2): ``sigma`` is the fraction of the units
of a layer that are *shared by every task*; the other ``1 - sigma`` are task specific. ``sigma = 0``
gives each task its own units (disjoint subnetworks when there are at least as many units as
tasks), ``sigma = 1`` makes every unit shared (hard parameter sharing). The authors' public code
(``taskrouting.py`` and ``routed_vgg.py`` of gstrezoski/TaskRouting) does something else, offered as
``convention="knockout"``: each task zeroes ``int(sigma * C)`` units of its own, drawn independently
per task, so any subset of tasks can share a unit and a unit may be used by no task at all; there
``sigma = 0`` is hard sharing and the units a task keeps are about ``1 - sigma``. The two are not
a change of variable: compare them by name.

With ``C`` units, ``T`` tasks and ``n_s = round(sigma * C)`` shared units, the ``C - n_s`` specific
units are dealt out at random to the tasks in turn, so every unit is used by at least one task and
each mask row has about ``(1 - sigma) * C * (1 - 1 / T)`` zeros. When ``C - n_s < T`` each task gets
one specific unit and the specific units are reused by several tasks.

The active task is an argument of ``forward`` (an ``int``, or a ``LongTensor`` of per-example task
ids), never a global, so DataParallel/DDP replicas and concurrent models cannot disturb one another.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CONVENTIONS", "routing_masks", "TaskRouting"]


CONVENTIONS = ("paper", "knockout")


def routing_masks(
    num_tasks: int,
    num_units: int,
    sigma: float,
    generator: torch.Generator | None = None,
    convention: str = "paper",
) -> torch.Tensor:
    """Binary routing masks ``(num_tasks, num_units)`` (``bool``) for sharing ratio ``sigma``.

    Args:
        num_tasks: number of tasks ``T`` (>= 1).
        num_units: number of channels ``C`` of the routed layer (>= 1).
        sigma: in ``[0, 1]``; ``"paper"``: the fraction of units shared by all tasks,
            ``"knockout"``: the fraction each task zeroes (see module docstring).
        generator: source of randomness (CPU generator); ``None`` uses torch's global RNG.
        convention: ``"paper"`` (sections 3 and 4.2) or ``"knockout"`` (the authors' code).
    """
    if num_tasks < 1 or num_units < 1:
        raise ValueError(f"need num_tasks >= 1 and num_units >= 1, got {num_tasks=}, {num_units=}")
    if not 0.0 <= float(sigma) <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention == "knockout":
        # taskrouting.py: unit_mapping[t, rand(T, C).argsort(1)[:, :int(C * sigma)]] = 0
        order = torch.rand(num_tasks, num_units, generator=generator).argsort(1)
        masks = torch.ones(num_tasks, num_units, dtype=torch.bool)
        masks.scatter_(1, order[:, : int(num_units * float(sigma))], False)
        return masks
    masks = torch.zeros(num_tasks, num_units, dtype=torch.bool)
    perm = torch.randperm(num_units, generator=generator)
    n_shared = int(round(float(sigma) * num_units))
    shared, specific = perm[:n_shared], perm[n_shared:]
    masks[:, shared] = True
    n_spec = specific.numel()
    if n_spec:
        task_order = torch.randperm(num_tasks, generator=generator)
        if n_spec >= num_tasks:
            # deal the specific units to the tasks in turn: each unit owned by exactly one task
            owners = task_order[torch.arange(n_spec) % num_tasks]
            masks[owners, specific] = True
        else:
            # fewer units than tasks: one unit per task, every unit used by at least one task
            units = specific[torch.arange(num_tasks) % n_spec]
            masks[task_order, units] = True
    return masks


class TaskRouting(nn.Module):
    """Task Routing Layer (section 3.2, eq. 1): ``TRL_A(X) = m_A * X`` channel-wise.

    Place it right after batch-norm (section 3.2, fig. 3). The masks are a non-trainable ``bool``
    buffer ``masks`` of shape ``(num_tasks, num_units)``, saved and restored with ``state_dict``.
    The product is out of place, so a masked channel receives exactly zero gradient whatever
    activation follows.

    Args:
        num_units: number of channels ``C``.
        num_tasks: number of tasks ``T``.
        sigma: sharing ratio, the fraction of units shared by all tasks (paper convention,
            0 = task-specific units only, 1 = hard sharing), or with ``convention="knockout"``
            the fraction of units each task zeroes (the authors' code; 0 = hard sharing).
        generator: a ``torch.Generator`` for the masks (takes precedence over ``seed``).
        seed: seed for a private generator when ``generator`` is not given; with neither, the
            global RNG is used.
        masks: explicit ``(num_tasks, num_units)`` masks instead of random ones.
        convention: ``"paper"`` or ``"knockout"``, see :func:`routing_masks`.

    ``forward(x, task)``: ``x`` is ``(B, C, *spatial)`` (any number of spatial dims, or none);
    ``task`` is an ``int`` (one task for the whole batch, algorithm 1) or a ``LongTensor`` of
    shape ``(B,)`` with one task id per example.
    """

    def __init__(
        self,
        num_units: int,
        num_tasks: int,
        sigma: float = 0.5,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        masks: torch.Tensor | None = None,
        convention: str = "paper",
    ):
        super().__init__()
        self.num_units, self.num_tasks, self.sigma, self.convention = int(num_units), int(num_tasks), float(sigma), convention
        if masks is None:
            if generator is None and seed is not None:
                generator = torch.Generator().manual_seed(int(seed))
            masks = routing_masks(self.num_tasks, self.num_units, self.sigma, generator, convention)
        masks = torch.as_tensor(masks).bool()
        if masks.shape != (self.num_tasks, self.num_units):
            raise ValueError(f"masks must have shape ({num_tasks}, {num_units}), got {tuple(masks.shape)}")
        if convention == "paper" and not bool(masks.any(0).all()):  # the knockout draw may leave a unit to no task
            raise ValueError("every unit must be used by at least one task")
        self.register_buffer("masks", masks)

    def mask_for(self, task: int | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Mask rows for ``task``: ``(1, C)`` for an ``int``, ``(B, C)`` for per-example ids."""
        if isinstance(task, torch.Tensor) and task.ndim > 0:
            m = self.masks[task.to(self.masks.device)]
        else:
            m = self.masks[int(task)].unsqueeze(0)
        return m if dtype is None else m.to(dtype)

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_units:
            raise ValueError(f"expected {self.num_units} channels, got input of shape {tuple(x.shape)}")
        m = self.mask_for(task, x.dtype)
        m = m.reshape(m.shape + (1,) * (x.ndim - 2))
        return x * m

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, num_tasks={self.num_tasks}, sigma={self.sigma}, convention={self.convention!r}"
