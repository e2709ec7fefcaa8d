"""HighResNet with AdaShare select-or-skip gates on its residual blocks, 2D or 3D.

The trunk is the plain (hard-shared) counterpart of :class:`~mtl_med.networks.SFGHighResNet`:
a 3x3 convolution, three stages of MONAI ``HighResBlock`` residual blocks with dilations 1, 2, 4
(SFG paper, appendix B), a 3x3 convolution after every stage and a final 3x3 convolution, then one
linear 1x1 head per task. The convolutions between stages change the width, so every residual
block maps ``C`` to ``C`` channels and its shortcut is the identity: a skipped block (AdaShare,
section 3.1) passes its input through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from monai.networks.nets.highresnet import HighResBlock
from torch import nn

from mtl_med.layers.block_gate import BlockPolicy
from mtl_med.layers.task_routing import as_task_index, split_by_task
from mtl_med.losses.adashare import DEFAULT_LAMBDA_SHARING, DEFAULT_LAMBDA_SPARSITY, AdaShareRegularizer

__all__ = ["AdaShareHighResNet"]


class AdaShareHighResNet(nn.Module):
    """HighResNet whose residual blocks are gated per task by a :class:`~mtl_med.layers.block_gate.BlockPolicy`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: channels of each task head: a sequence (one per task) or a mapping name -> int.
        task_names: e.g. ``("sct", "seg")``.
        features: widths of the three stages (16, 32, 64, as SFG-HighResNet).
        dilations: dilation of each stage's blocks (1, 2, 4).
        blocks_per_stage: residual blocks per stage (2): ``len(features) * blocks_per_stage`` gated blocks.
        act, norm: MONAI activation / normalisation of the blocks and convolutions.
        tau: initial Gumbel-Softmax temperature (AdaShare section 3.2: 5).
        lambda_sparsity, lambda_sharing: eq. 7 weights returned by ``regularizer()`` while the policy
            is learned (Table 7 defaults).
        policy: discrete ``(num_tasks, num_blocks)`` policy for re-training / inference.

    ``forward(x, task=None, generator=None)`` returns ``{task: (B, out_k, *spatial)}`` for every task
    (``task=None``), one task (``int`` or name) or per-example ``(B,)`` task ids (outputs of the
    examples of each task present). In the ``"warmup"`` mode every block runs and the trunk is
    computed once for all tasks.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: Sequence[int] | Mapping[str, int] = (1, 6),
        task_names: Sequence[str] = ("sct", "seg"),
        features: Sequence[int] = (16, 32, 64),
        dilations: Sequence[int] = (1, 2, 4),
        blocks_per_stage: int = 2,
        act: str | tuple = "prelu",
        norm: str | tuple = ("batch", {"affine": True}),
        tau: float = 5.0,
        lambda_sparsity: float = DEFAULT_LAMBDA_SPARSITY,
        lambda_sharing: float = DEFAULT_LAMBDA_SHARING,
        policy: torch.Tensor | Sequence | None = None,
    ):
        super().__init__()
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.task_names = [str(t) for t in task_names]
        if not self.task_names or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task_names must be non-empty and unique, got {self.task_names}")
        self.num_tasks = len(self.task_names)
        outs = [int(out_channels[t]) for t in self.task_names] if isinstance(out_channels, Mapping) else [int(c) for c in out_channels]
        if len(outs) != self.num_tasks:
            raise ValueError(f"{self.num_tasks} task names but {len(outs)} head widths")
        if len(features) != len(dilations) or blocks_per_stage < 1:
            raise ValueError("features and dilations need one entry per stage and blocks_per_stage >= 1")
        self.spatial_dims = spatial_dims
        acti = (act, {}) if isinstance(act, str) else act
        normi = (norm, {}) if isinstance(norm, str) else norm

        def conv(cin, cout):
            return Convolution(spatial_dims, cin, cout, kernel_size=3, act=acti, norm=normi)

        self.convs = nn.ModuleList([conv(in_channels, features[0])])
        self.blocks = nn.ModuleList()
        self.block_names = []
        for s, (width, dilation) in enumerate(zip(features, dilations)):
            for i in range(blocks_per_stage):
                self.blocks.append(HighResBlock(spatial_dims, width, width, dilation=dilation, norm_type=normi, acti_type=acti))
                self.block_names.append(f"stage{s + 1}.{i}")
            self.convs.append(conv(width, features[s + 1] if s + 1 < len(features) else features[-1]))
        self.convs.append(conv(features[-1], features[-1]))
        self.blocks_per_stage = int(blocks_per_stage)
        self.heads = nn.ModuleList(Conv[Conv.CONV, spatial_dims](features[-1], c, 1, bias=True) for c in outs)
        self.policy = BlockPolicy(self.num_tasks, len(self.blocks), tau=tau, policy=policy)
        self.policy_loss = AdaShareRegularizer(lambda_sparsity, lambda_sharing)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [self.policy.logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("policy.")]

    def regularizer(self) -> torch.Tensor:
        """AdaShare's ``lambda_sp L_sparsity + lambda_sh L_sharing`` while the policy is learned, else 0."""
        if self.policy.mode != "learn":
            return self.policy.logits.new_zeros(())
        return self.policy_loss(self.policy.select_probability(effective=True))

    def trunk(self, x: torch.Tensor, gates: Sequence | torch.Tensor | None = None) -> torch.Tensor:
        """The shared trunk with block ``l`` gated by ``gates[l]``: ``None`` (run), a Python bool
        (run or skip, no computation when skipped), or a scalar / ``(B,)`` tensor
        ``g * block(x) + (1 - g) * x``."""
        y = self.convs[0](x)
        for l, block in enumerate(self.blocks):
            g = None if gates is None else gates[l]
            if isinstance(g, bool):
                y = block(y) if g else y
            elif g is None:
                y = block(y)
            else:
                g = g.reshape(g.shape + (1,) * (y.ndim - g.ndim)) if g.ndim else g
                y = g * block(y) + (1 - g) * y
            if (l + 1) % self.blocks_per_stage == 0:
                y = self.convs[(l + 1) // self.blocks_per_stage](y)
        return self.convs[-1](y)

    def _task_gates(self, gates: torch.Tensor | None, task: int | torch.Tensor):
        if gates is None:
            return None
        if isinstance(task, torch.Tensor):
            return [gates[task.to(gates.device), l] for l in range(self.num_blocks)]
        if self.policy.mode == "fixed":
            return [bool(v) for v in self.policy.policy[task].tolist()]
        return list(gates[task].unbind(0))

    def forward(
        self,
        x: torch.Tensor,
        task: int | str | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        gates = self.policy.gates(generator)
        if task is None:
            if gates is None:
                y = self.trunk(x)
                return {n: h(y) for n, h in zip(self.task_names, self.heads)}
            return {n: self.heads[k](self.trunk(x, self._task_gates(gates, k))) for k, n in enumerate(self.task_names)}
        task = as_task_index(task, self.task_names)
        if isinstance(task, torch.Tensor):
            if task.shape != (x.shape[0],):
                raise ValueError(f"per-example task ids must have shape ({x.shape[0]},), got {tuple(task.shape)}")
            task = task.to(x.device)
            y = self.trunk(x, self._task_gates(gates, task))
            rows = split_by_task(y, task, self.task_names)
            return {n: self.heads[self.task_names.index(n)](v) for n, v in rows.items()}
        return {self.task_names[task]: self.heads[task](self.trunk(x, self._task_gates(gates, task)))}
