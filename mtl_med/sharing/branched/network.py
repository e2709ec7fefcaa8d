"""A branched multi-task network: the backbone's blocks copied per branch of a task tree (section 3.2)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from mtl_med.networks.blocks import Backbone, Trunk

from ..base import MultiTaskNetwork
from .trees import canonical_tree, load_tree_json

__all__ = ["Branched"]


class Branched(MultiTaskNetwork):
    """Tasks share the stem and branch off along a tree over the backbone's blocks.

    The backbone's segments between branch points are the tree's levels: segment 0 (up to the first
    branch point) is the stem, shared by every task; segment ``l + 1`` is block ``l`` of the tree,
    copied once per branch of row ``l`` of ``tree`` (a bmtas ``branch_config``: blocks x tasks branch
    labels, refined by the rows above). A forward for one task runs only its path; for all tasks,
    each branch runs once.

    Args:
        tree: the ``branch_config`` (a list of rows, one per block), a ``tree.json`` /
            ``branch_config.json`` path, or ``None`` (every block shared: hard sharing).
    """

    name = "branched"
    may_skip_parameters = True

    def __init__(self, backbone: Backbone, task_names, heads, tree: Sequence | str | os.PathLike | None = None, bn_inference: str = "population"):
        super().__init__(backbone, task_names, heads, bn_inference)
        bounds = [0, *(b + 1 for b in backbone.branch_points)]
        num_blocks = len(bounds) - 2
        if tree is None:
            tree = [[0] * self.num_tasks for _ in range(num_blocks)]
        elif isinstance(tree, (str, os.PathLike)):
            tree = load_tree_json(tree)["config"]
        config = canonical_tree(tree)
        if len(config) != num_blocks or any(len(row) != self.num_tasks for row in config):
            raise ValueError(
                f"the tree has {len(config)} rows of {[len(r) for r in config]} tasks; backbone {backbone.name!r} has "
                f"{num_blocks} branchable blocks and the network {self.num_tasks} tasks"
            )
        self.config = [list(map(int, row)) for row in config]
        self.stem = Trunk(backbone, start=0, stop=bounds[1])
        self.blocks = nn.ModuleList(
            nn.ModuleList(Trunk(backbone, start=bounds[l + 1], stop=bounds[l + 2]) for _ in range(max(row) + 1))
            for l, row in enumerate(self.config)
        )
        self.register_buffer("tree", torch.tensor(self.config, dtype=torch.long).reshape(num_blocks, self.num_tasks))

    @classmethod
    def refuse(cls, backbone: Backbone) -> str | None:
        if len(backbone.branch_points) < 2:
            return "a branched network needs a stem and at least one block after it (two branch points)"
        return None

    def _path(self, x: torch.Tensor, task: int) -> torch.Tensor:
        y = self.stem(x)
        for row, branches in zip(self.config, self.blocks):
            y = branches[row[task]](y)
        return y

    def task_features(self, x, task, generator=None):
        if isinstance(task, int):
            return self._path(x, task)
        ys = {0: self.stem(x)}  # branch label at the previous level -> its output
        parents = [0] * self.num_tasks
        for row, branches in zip(self.config, self.blocks):
            ys = {b: branches[b](ys[parents[row.index(b)]]) for b in sorted(set(row))}
            parents = row
        feats = [ys[parents[t]] for t in range(self.num_tasks)]
        return feats if task is None else self.rows_of(feats, task)
