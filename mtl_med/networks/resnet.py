"""Multi-task ResNet backbones (2D/3D) with one sharing mechanism chosen by argument.

``sharing="hard"``: every task uses the whole backbone (the Multi-Task baseline).
``sharing="routing"``: a Task Routing Layer after every conv + batch-norm (Strezoski et al. 2019,
section 4.3), sharing ratio ``sigma`` in the paper's convention (see
:mod:`mtl_med.layers.task_routing`).
``sharing="adashare"``: per-task select-or-skip gates on every residual block (Sun et al. 2020,
section 3.1); ResNet-18 has 8 and ResNet-34 16 gated blocks.
``sharing="cross_stitch"``: one ResNet column per task, the columns mixed by a cross-stitch unit
after the stem and after every stage (Misra et al. 2016, section 3: units after each pooling
stage), for any number of tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

from mtl_med.layers.block_gate import BlockPolicy
from mtl_med.layers.cross_stitch import CrossStitch
from mtl_med.layers.task_routing import TaskRouting, as_task_index, split_by_task
from mtl_med.losses.adashare import DEFAULT_LAMBDA_SHARING, DEFAULT_LAMBDA_SPARSITY, AdaShareRegularizer

__all__ = ["TaskHeads", "multitask_outputs", "RoutedResidualBlock", "ResNet", "resnet18", "resnet34", "SHARING_MODES"]

SHARING_MODES = ("hard", "routing", "adashare", "cross_stitch")


def _act(act: str | tuple) -> nn.Module:
    name, args = (act, {}) if isinstance(act, str) else (act[0], dict(act[1]))
    return Act[name](**args)


class TaskHeads(nn.Module):
    """One linear head (optionally with a hidden layer) per task, stored as batched weights.

    The weights of all tasks live in ``(T, out, in)`` tensors, so hundreds of tasks cost one
    parameter per weight and no Python loop. Task ``k`` uses the first ``out_channels[k]`` rows.

    Args:
        in_features: feature size.
        out_channels: number of outputs of each task.
        hidden: width of a per-task hidden layer (the task "embedding space" of Task Routing,
            section 3.3); 0 for a single linear layer.
        act: activation after the hidden layer.
    """

    def __init__(self, in_features: int, out_channels: Sequence[int], hidden: int = 0, act: str | tuple = "relu"):
        super().__init__()
        self.out_channels = [int(c) for c in out_channels]
        t, o = len(self.out_channels), max(self.out_channels)
        dims = [in_features, hidden, o] if hidden else [in_features, o]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(t, fan_out, fan_in)
            for k in range(t):  # nn.Linear's default initialisation, per task
                nn.init.kaiming_uniform_(w[k], a=math.sqrt(5))
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(t, fan_out).uniform_(-bound, bound)))
        self.act = _act(act) if hidden else None

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """``x`` is ``(B, in)``; ``task`` an int (``(B, out_k)`` returned) or ``(B,)`` ids (``(B, max_out)``)."""
        per_example = isinstance(task, torch.Tensor) and task.ndim > 0
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i:
                x = self.act(x)
            if per_example:
                x = torch.einsum("bi,boi->bo", x, w[task]) + b[task]
            else:
                x = F.linear(x, w[task], b[task])
        return x if per_example else x[:, : self.out_channels[int(task)]]


def multitask_outputs(
    x: torch.Tensor,
    task: int | str | torch.Tensor | None,
    task_names: Sequence[str],
    heads: TaskHeads,
    features,
    task_specific: bool,
) -> dict[str, torch.Tensor]:
    """``{task_name: output}`` for ``task`` ``None`` (all tasks), an ``int``/name, or ``(B,)`` ids.

    ``features(x, task)`` returns ``(B, F)`` features; when ``task_specific`` is False it is called
    once with ``task=None`` and shared by every head.
    """
    if task is None:
        if not task_specific:
            feats = features(x, None)
            return {n: heads(feats, k) for k, n in enumerate(task_names)}
        return {n: heads(features(x, k), k) for k, n in enumerate(task_names)}
    task = as_task_index(task, task_names)
    if isinstance(task, torch.Tensor):
        if task.shape != (x.shape[0],):
            raise ValueError(f"per-example task ids must have shape ({x.shape[0]},), got {tuple(task.shape)}")
        task = task.to(x.device)
        feats = features(x, task if task_specific else None)
        out = split_by_task(heads(feats, task), task, task_names)
        return {n: v[:, : heads.out_channels[list(task_names).index(n)]] for n, v in out.items()}
    return {task_names[task]: heads(features(x, task if task_specific else None), task)}


class RoutedResidualBlock(nn.Module):
    """Basic residual block (two 3x3 convolutions) with optional task routing and a gate.

    ``forward(x, task, gate)``: with ``gate`` ``None`` it is the plain block
    ``act(shortcut(x) + F(x))``; otherwise ``gate * act(shortcut(x) + F(x)) + (1 - gate) * shortcut(x)``
    (AdaShare; the shortcut is the identity or the 1x1 downsampling path). A Python ``0``/``1``
    gate skips the unneeded computation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
        routing: dict | None = None,
    ):
        super().__init__()
        conv, norm_t = Conv[Conv.CONV, spatial_dims], Norm[norm if isinstance(norm, str) else norm[0], spatial_dims]
        norm_args = {} if isinstance(norm, str) else dict(norm[1])
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_t(out_channels, **norm_args)
        self.act1 = _act(act)
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_t(out_channels, **norm_args)
        self.act2 = _act(act)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), norm_t(out_channels, **norm_args)
            )
        self.trl1 = self.trl2 = self.trl_down = None
        if routing is not None:
            self.trl1 = TaskRouting(out_channels, **routing)
            self.trl2 = TaskRouting(out_channels, **routing)
            if self.downsample is not None:
                self.trl_down = TaskRouting(out_channels, **routing)

    @staticmethod
    def _route(trl, x, task):
        return x if trl is None else trl(x, task)

    def shortcut(self, x: torch.Tensor, task=None) -> torch.Tensor:
        if self.downsample is None:
            return x
        return self._route(self.trl_down, self.downsample(x), task)

    def residual(self, x: torch.Tensor, task=None) -> torch.Tensor:
        y = self.act1(self._route(self.trl1, self.bn1(self.conv1(x)), task))
        return self._route(self.trl2, self.bn2(self.conv2(y)), task)

    def forward(self, x: torch.Tensor, task=None, gate: float | torch.Tensor | None = None) -> torch.Tensor:
        s = self.shortcut(x, task)
        if isinstance(gate, (bool, int, float)):
            if not gate:
                return s
            gate = None
        out = self.act2(s + self.residual(x, task))
        if gate is None:
            return out
        g = gate.reshape(gate.shape + (1,) * (out.ndim - gate.ndim)) if gate.ndim else gate
        return g * out + (1 - g) * s


class ResNet(nn.Module):
    """Multi-task ResNet with hard sharing, task routing, AdaShare block gates or cross-stitch columns.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        task_names: one name per task (``num_tasks`` tasks).
        out_channels: outputs per task: one ``int`` for all, a sequence, or a mapping name -> int.
        layers: residual blocks per stage, ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for ResNet-34.
        widths: channels per stage.
        sharing: ``"hard"``, ``"routing"``, ``"adashare"`` or ``"cross_stitch"``.
        sigma: Task Routing sharing ratio (fraction of units shared by all tasks; 1 = hard sharing).
        seed: seed of the routing masks (drawn in construction order from one generator).
        act: activation (MONAI ``Act`` name or ``(name, args)``), e.g. ``"relu"``, ``"prelu"``.
        norm: normalisation (MONAI ``Norm`` name or ``(name, args)``).
        conv1_t_size, conv1_t_stride, no_max_pool: stem, as MONAI's ResNet (use 3, 1, True for
            small images such as 8x8 digits or 32x32 CIFAR).
        head_hidden: width of a per-task hidden layer in the heads (0: linear heads).
        tau: initial AdaShare temperature (section 3.2: 5).
        lambda_sparsity, lambda_sharing: AdaShare eq. 7 weights returned by ``regularizer()``
            while the policy is learned (Table 7 defaults).
        policy: discrete AdaShare ``(num_tasks, num_blocks)`` policy for re-training / inference.
        stitch_self_weight: initial ``alpha_tt`` of the cross-stitch units (Misra et al., section 5:
            ``(alpha_S, alpha_D) = (0.9, 0.1)``; here the 0.1 is split over the other tasks).
        stitch_per_channel: one ``T x T`` mixing matrix per channel instead of per layer.

    With ``sharing="cross_stitch"`` the stem and the blocks of column 0 are ``conv1``, ``bn1``,
    ``blocks`` (as in the other modes) and those of column ``t > 0`` live in ``columns[t - 1]``.

    ``forward(x, task=None, generator=None)`` returns ``{task_name: output}``: all tasks when
    ``task`` is ``None``; one task for an ``int`` or name (one task per mini-batch, algorithm 1 of
    Task Routing); with a ``LongTensor`` of per-example ids, ``{name: outputs of the examples of that
    task}`` for the tasks present (group the targets with
    :func:`mtl_med.layers.task_routing.split_by_task`). ``generator`` drives the Gumbel noise of AdaShare.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        task_names: Sequence[str] = ("task_0", "task_1"),
        out_channels: int | Sequence[int] | Mapping[str, int] = 1,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        sharing: str = "hard",
        sigma: float = 0.5,
        seed: int = 0,
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
        conv1_t_size: int = 7,
        conv1_t_stride: int = 2,
        no_max_pool: bool = False,
        head_hidden: int = 0,
        tau: float = 5.0,
        lambda_sparsity: float = DEFAULT_LAMBDA_SPARSITY,
        lambda_sharing: float = DEFAULT_LAMBDA_SHARING,
        policy: torch.Tensor | Sequence | None = None,
        stitch_self_weight: float = 0.9,
        stitch_per_channel: bool = False,
    ):
        super().__init__()
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if sharing not in SHARING_MODES:
            raise ValueError(f"sharing must be one of {SHARING_MODES}, got {sharing!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(layers) != len(widths):
            raise ValueError(f"layers and widths must have the same length, got {layers} and {widths}")
        self.task_names = [str(t) for t in task_names]
        if len(set(self.task_names)) != len(self.task_names) or not self.task_names:
            raise ValueError(f"task_names must be non-empty and unique, got {self.task_names}")
        self.num_tasks = len(self.task_names)
        if isinstance(out_channels, int):
            outs = [out_channels] * self.num_tasks
        elif isinstance(out_channels, Mapping):
            outs = [int(out_channels[t]) for t in self.task_names]
        else:
            outs = [int(c) for c in out_channels]
        if len(outs) != self.num_tasks:
            raise ValueError(f"out_channels has {len(outs)} entries for {self.num_tasks} tasks")
        self.sharing, self.spatial_dims = sharing, spatial_dims

        routing = None
        if sharing == "routing":
            routing = {"num_tasks": self.num_tasks, "sigma": sigma, "generator": torch.Generator().manual_seed(int(seed))}
        stem, self.blocks, self.block_names, in_ch = self._column(
            spatial_dims, in_channels, layers, widths, act, norm, conv1_t_size, conv1_t_stride, no_max_pool, routing
        )
        self.conv1, self.bn1, self.trl1, self.act, self.maxpool = stem
        # cross-stitch: columns 1..T-1 (column 0 is the attributes above) and one unit per stage
        self.columns, self.stitches, self.stage_ends = None, None, []
        if sharing == "cross_stitch":
            if self.num_tasks < 2:
                raise ValueError(f"cross_stitch needs at least 2 tasks, got {self.num_tasks}")
            self.columns = nn.ModuleList()
            for _ in range(1, self.num_tasks):
                (c1, b1, _, a1, mp), blks, _, _ = self._column(
                    spatial_dims, in_channels, layers, widths, act, norm, conv1_t_size, conv1_t_stride, no_max_pool, None
                )
                self.columns.append(nn.ModuleDict({"conv1": c1, "bn1": b1, "act": a1, "maxpool": mp, "blocks": blks}))
            self.stage_ends = [int(e) - 1 for e in torch.tensor(list(layers)).cumsum(0)]
            self.stitches = nn.ModuleList(
                CrossStitch(self.num_tasks, w, self_weight=stitch_self_weight, per_channel=stitch_per_channel)
                for w in [widths[0], *widths]
            )
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.heads = TaskHeads(in_ch, outs, hidden=head_hidden, act=act)

        self.policy = None
        if sharing == "adashare":
            self.policy = BlockPolicy(self.num_tasks, len(self.blocks), tau=tau, policy=policy)
            self.policy_loss = AdaShareRegularizer(lambda_sparsity, lambda_sharing)
        elif policy is not None:
            raise ValueError("policy is only used with sharing='adashare'")

    @staticmethod
    def _column(spatial_dims, in_channels, layers, widths, act, norm, conv1_t_size, conv1_t_stride, no_max_pool, routing):
        """Stem ``(conv1, bn1, trl1, act, maxpool)``, residual blocks, block names and output width."""
        conv, norm_t = Conv[Conv.CONV, spatial_dims], Norm[norm if isinstance(norm, str) else norm[0], spatial_dims]
        norm_args = {} if isinstance(norm, str) else dict(norm[1])
        conv1 = conv(in_channels, widths[0], conv1_t_size, stride=conv1_t_stride, padding=conv1_t_size // 2, bias=False)
        bn1 = norm_t(widths[0], **norm_args)
        trl1 = TaskRouting(widths[0], **routing) if routing else None
        maxpool = nn.Identity() if no_max_pool else Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)
        blocks, names, in_ch = [], [], widths[0]
        for stage, (n, width) in enumerate(zip(layers, widths)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(RoutedResidualBlock(spatial_dims, in_ch, width, stride, act, norm, routing))
                names.append(f"layer{stage + 1}.{i}")
                in_ch = width
        return (conv1, bn1, trl1, _act(act), maxpool), nn.ModuleList(blocks), names, in_ch

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    # --- AdaShare helpers --------------------------------------------------------------------
    def policy_parameters(self) -> list[nn.Parameter]:
        """The AdaShare policy logits (empty for the other sharing modes)."""
        return [] if self.policy is None else [self.policy.logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the policy logits."""
        ids = {id(p) for p in self.policy_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def regularizer(self) -> torch.Tensor:
        """AdaShare's ``lambda_sp L_sparsity + lambda_sh L_sharing`` while the policy is learned, else 0."""
        if self.policy is None or self.policy.mode != "learn":
            return self.heads.weights[0].new_zeros(())
        return self.policy_loss(self.policy.select_probability(effective=True))

    # --- forward -----------------------------------------------------------------------------
    def features(self, x: torch.Tensor, task: int | torch.Tensor | None = None, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features ``(B, C)`` for ``task`` (``int`` or ``(B,)`` ids) under ``gates`` ``(K, L)``."""
        y = self.bn1(self.conv1(x))
        if self.trl1 is not None:
            y = self.trl1(y, task)
        y = self.maxpool(self.act(y))
        for l, block in enumerate(self.blocks):
            g = None
            if gates is not None:
                if isinstance(task, torch.Tensor) and task.ndim > 0:
                    g = gates[task.to(gates.device), l]
                elif self.policy.mode == "fixed":
                    g = bool(self.policy.policy[int(task), l])
                else:
                    g = gates[int(task), l]
            y = block(y, task, g)
        return torch.flatten(self.pool(y), 1)

    def stitched_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Cross-stitch mode: the pooled features ``(B, C)`` of every task's column."""
        cols = [{"conv1": self.conv1, "bn1": self.bn1, "act": self.act, "maxpool": self.maxpool, "blocks": self.blocks}]
        cols += list(self.columns)
        ys = self.stitches[0]([c["maxpool"](c["act"](c["bn1"](c["conv1"](x)))) for c in cols])
        stage = 1
        for l in range(self.num_blocks):
            ys = [c["blocks"][l](y) for c, y in zip(cols, ys)]
            if l in self.stage_ends:
                ys = self.stitches[stage](ys)
                stage += 1
        return [torch.flatten(self.pool(y), 1) for y in ys]

    def forward(
        self,
        x: torch.Tensor,
        task: int | str | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.sharing == "cross_stitch":  # every column is needed whatever task is asked for
            feats = self.stitched_features(x)

            def column(_, t):
                if isinstance(t, torch.Tensor):
                    return torch.stack(feats)[t, torch.arange(x.shape[0], device=x.device)]
                return feats[t]

            return multitask_outputs(x, task, self.task_names, self.heads, column, task_specific=True)
        gates = self.policy.gates(generator) if self.policy is not None else None
        task_specific = self.sharing == "routing" or gates is not None
        return multitask_outputs(x, task, self.task_names, self.heads, lambda y, t: self.features(y, t, gates), task_specific)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 layout (8 residual blocks; AdaShare's NYU v2 2-task backbone)."""
    return ResNet(layers=(2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 layout (16 residual blocks; AdaShare's backbone for most scenarios)."""
    return ResNet(layers=(3, 4, 6, 3), **kwargs)
