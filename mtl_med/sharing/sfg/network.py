"""Stochastic Filter Groups (Bragman et al., ICCV 2019) on any backbone of plain convolutions and
width-preserving residual blocks, and the paper's own fixed groupings (MT-constant mask, MT-constant p).

Every convolution unit of the backbone becomes an :class:`~mtl_med.sharing.sfg.layers.SFGConv` that turns
``T + 1`` streams ``[F_1 .. F_T, F_s]`` into ``T + 1`` streams; every run of residual blocks
between two of them becomes one tower per group (fig. 5: each group has its own residual tower),
applied to that group's stream and masked back to the group's channels; pooling acts on each
stream. Task ``t``'s head sees ``F_t + F_s`` of the last layer.

The original code left the towers unmasked; masking keeps the streams sparse at non-overlapping
channels, as section 3.1 describes, and makes an empty group (e.g. the task groups when every kernel
is drawn shared) contribute exactly zero.

The paper's other baselines (section 4.1, A.4: single-task networks, MT-hard sharing, cross-stitch) are
the registered methods ``single_task``, ``hard_sharing`` and ``cross_stitch`` of :mod:`mtl_med.sharing`,
built once; they are not SFG groupings.
"""

from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from mtl_med.networks.blocks import Backbone, ConvUnit, PoolUnit, Residual

from ..base import MultiTaskNetwork
from .compact import CompactSFG, compact_unsupported
from .layers import SHARING_MODES as GROUPINGS
from .layers import SFGConv, _channel_mask

__all__ = ["SFG", "GROUPINGS"]


class _Towers(nn.ModuleList):
    """One tower (a run of residual blocks) per group."""


class _StreamPool(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, streams):
        return [self.pool(f) for f in streams]


class SFG(MultiTaskNetwork):
    """Stochastic filter groups on every convolution of the backbone.

    Args:
        grouping: ``"sfg"`` (learned ``p``, A.1) or one of the paper's fixed groupings,
            ``"constant_mask"`` (Table 2's MT-constant mask, Fig. 3(i)) and ``"constant_p"``
            (MT-constant p = [1/3, 1/3, 1/3]); see :func:`~mtl_med.sharing.sfg.layers.grouping_init`.
        shared_init: initial shared probability of learned layers (A.1: 0.6), or ``"dirichlet"`` /
            ``"constant_mask"`` (the other starts of section 5.4; see :func:`~mtl_med.sharing.sfg.layers.grouping_init`).
        hard, noise, per_example: see :class:`~mtl_med.sharing.sfg.layers.StochasticFilterGroups`.
        lambda1, lambda2: weights of eq. 5 (A.1: 1e-6 and 1e-5).
    """

    name = "sfg"
    min_tasks = 2

    def __init__(
        self,
        backbone: Backbone,
        task_names,
        heads,
        grouping: str = "sfg",
        shared_init: float | str = 0.6,
        hard: bool = True,
        noise: str = "log_p",
        per_example: bool = False,
        lambda1: float = 1e-6,
        lambda2: float = 1e-5,
        bn_inference: str = "population",
    ):
        super().__init__(backbone, task_names, heads, bn_inference)
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown SFG grouping {grouping!r}; expected one of {GROUPINGS}")
        self.grouping, self.lambda1, self.lambda2 = grouping, float(lambda1), float(lambda2)
        T, f = self.num_tasks, backbone.factory()
        sfg = dict(num_tasks=T, mode=grouping, shared_init=shared_init, hard=hard, noise=noise, per_example=per_example, act=backbone.act, norm=backbone.norm)
        layers, run = [], []
        for u in backbone.units:
            if isinstance(u, Residual):
                run.append(u)
                continue
            if run:
                layers.append(_Towers(nn.Sequential(*(r.build(f) for r in run)) for _ in range(T + 1)))
            if isinstance(u, ConvUnit):
                # "concat" merge where residual blocks sit between SFG layers (end of section 3.1)
                layers.append(
                    SFGConv(backbone.spatial_dims, u.in_channels, u.out_channels, kernel_size=u.kernel_size, dilation=u.dilation,
                            stride=u.stride, padding=u.padding, first=not layers, merge="concat" if run else "sum", **sfg)
                )
            else:
                layers.append(_StreamPool(u.build(f)))
            run = []
        if run:
            layers.append(_Towers(nn.Sequential(*(r.build(f) for r in run)) for _ in range(T + 1)))
        self.layers = nn.ModuleList(layers)

    @classmethod
    def refuse(cls, backbone: Backbone) -> str | None:
        if not isinstance(backbone.units[0], ConvUnit):
            return "its first unit must be a convolution (the first SFG layer reads the image)"
        changing = [u for u in backbone.units if isinstance(u, Residual) and (u.in_channels != u.out_channels or u.stride != 1)]
        if changing:
            return (
                "SFG groups the kernels of plain convolutions and runs one residual tower per group, masked to the"
                " channels of the group of the preceding SFG layer (section 3.1, fig. 5); residual blocks that change"
                " width or resolution (ResNet's stage transitions) have no such group to keep"
            )
        return None

    # ---- forward
    def task_features(self, x, task, generator=None):
        feats, z = x, None
        for layer in self.layers:
            if isinstance(layer, SFGConv):
                feats, z = layer(feats, generator, return_mask=True)
            elif isinstance(layer, _Towers):
                feats = [_channel_mask(z, g, self.spatial_dims) * tower(f) for g, (tower, f) in enumerate(zip(layer, feats))]
            else:
                feats = layer(feats)
        shared = feats[self.num_tasks]
        out = [feats[t] + shared for t in range(self.num_tasks)]
        if task is None:
            return out
        return out[task] if isinstance(task, int) else self.rows_of(out, task)

    # ---- training
    def sfg_layers(self):
        """``("sfg.j", layer)`` for the SFG layers in order (the names of the logs and exports)."""
        for j, m in enumerate(m for m in self.layers if isinstance(m, SFGConv)):
            yield f"sfg.{j}", m

    def regularizer(self) -> torch.Tensor:
        """``lambda1 * sum ||M||^2 - lambda2 * sum H(p)`` over SFG layers and kernels (eq. 5)."""
        layers = [m for _, m in self.sfg_layers()]
        return self.lambda1 * sum(m.kernel_norm() for m in layers) - self.lambda2 * sum(m.groups.entropy() for m in layers)

    def train_handlers(self, schedule=None, summary_writer=None, log_every: int = 100, grouping_interval: int = 100, network: nn.Module | None = None) -> list:
        """The temperature annealing of the Gumbel-Softmax (``schedule``, default A.1's
        ``max(0.1, exp(-1e-5 t))``) and the TensorBoard views of the grouping; ``network`` is the
        trained module when it wraps this one (DDP)."""
        from mtl_med.layers.gumbel import ExponentialTemperature

        from .handlers import GroupingHandler, TemperatureHandler

        net = self if network is None else network
        schedule = ExponentialTemperature() if schedule is None else schedule
        return [
            TemperatureHandler(schedule, net, summary_writer=summary_writer, log_every=log_every),
            GroupingHandler(summary_writer=summary_writer, network=net, interval=grouping_interval),
        ]

    def parameter_groups(self, lr: float, grouping_lr_scale: float = 1.0, **options) -> list:
        """The optimiser's parameters with the grouping logits (``*.groups.theta``) at
        ``lr * grouping_lr_scale``. The paper trains every parameter at one rate (A.1: Adam, 1e-3) for
        200k iterations; a larger rate on the logits lets the grouping form in a CPU-sized schedule.
        ``1.0`` returns the plain parameter list (one group, as the paper; checkpoints keep their layout)."""
        try:
            scale = float(grouping_lr_scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not scale > 0:  # NaN and non-numbers too
            raise ValueError(f"grouping_lr_scale must be a number > 0, got {grouping_lr_scale!r}")
        if scale == 1.0:
            return list(self.parameters())
        grouping = [p for n, p in self.named_parameters() if n.endswith("groups.theta")]
        ids = {id(p) for p in grouping}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": grouping, "lr": float(lr) * scale}]

    def set_temperature(self, tau: float) -> None:
        """Gumbel-Softmax temperature of every SFG layer (a buffer: checkpoints keep it)."""
        if tau <= 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        for _, m in self.sfg_layers():
            m.groups.tau.fill_(tau)

    @property
    def temperature(self) -> float:
        return float(next(self.sfg_layers())[1].groups.tau)

    # ---- inference
    def set_inference(self, mode: str = "sample", per_example: bool | None = None) -> None:
        """How group assignments are drawn outside training: ``"sample"`` (posterior draws),
        ``"relaxed"`` (Gumbel-Softmax at the current temperature) or ``"argmax"``; ``per_example``
        draws one assignment per batch element."""
        if mode not in ("sample", "relaxed", "argmax"):
            raise ValueError(f"inference mode must be 'sample', 'relaxed' or 'argmax', got {mode!r}")
        for _, m in self.sfg_layers():
            m.groups.inference = mode
            if per_example is not None:
                m.groups.per_example = per_example

    @contextlib.contextmanager
    def sampling_state(self, mode: str = "sample", per_example: bool | None = None):
        """Context: draw as :meth:`set_inference` says (``mode``, ``per_example``); every layer's
        drawing settings are restored afterwards."""
        layers = [m.groups for _, m in self.sfg_layers()]
        saved = [(g.inference, g.per_example) for g in layers]
        self.set_inference(mode, per_example)
        try:
            yield self
        finally:
            for g, (inference, pe) in zip(layers, saved):
                g.inference, g.per_example = inference, pe

    def fast_sampler_unsupported(self, mode: str = "sample") -> str | None:
        """Why the compacted pass (:mod:`.compact`) cannot draw in ``mode`` now, or ``None``."""
        reason = compact_unsupported(self)
        if reason is None and mode == "relaxed":
            reason = "relaxed mode draws soft assignments"
        return reason

    def fast_sampler(self, mode: str = "sample", dtype: torch.dtype = torch.float32, channels_last: bool = False):
        """The exact compacted pass (:class:`~mtl_med.sharing.sfg.compact.CompactSFG`: each group's kernels
        on its own inputs), or ``None`` where :meth:`fast_sampler_unsupported` gives a reason."""
        if self.fast_sampler_unsupported(mode) is not None:
            return None
        return CompactSFG(self, dtype=dtype, channels_last=channels_last)

    # ---- introspection
    def grouping_probabilities(self) -> dict[str, torch.Tensor]:
        """Layer name -> ``p`` of shape ``(kernels, T + 1)`` (detached, on CPU), for plotting."""
        return {name: m.groups.probabilities.detach().cpu() for name, m in self.sfg_layers()}

    def group_probability_sums(self) -> dict[str, list[float]]:
        """Layer name -> the sum of the kernels' class-wise probabilities per group ``G_1..G_T, G_s``, over the
        number of kernels (section 5.3: "we computed the sum of class-wise probabilities per layer"). A layer
        whose kernels are 75 % at p_s = 0.4 and 25 % at p_s = 0.9 is 52.5 % shared by this measure; counting
        most probable groups (:meth:`group_proportions`) would call it 100 % or 25 % shared, by its argmaxes."""
        return {name: (p.sum(0) / p.shape[0]).tolist() for name, p in self.grouping_probabilities().items()}

    def group_proportions(self) -> dict[str, list[float]]:
        """Layer name -> fraction of kernels whose most probable group is each of ``G_1..G_T, G_s`` (argmax
        counts; section 5.3's measure is :meth:`group_probability_sums`)."""
        out = {}
        for name, p in self.grouping_probabilities().items():
            counts = torch.bincount(p.argmax(-1), minlength=self.num_tasks + 1).float()
            out[name] = (counts / counts.sum()).tolist()
        return out

    def mean_entropy(self) -> dict[str, float]:
        """Layer name -> mean entropy of the kernels' grouping probabilities (nats)."""
        return {name: float(torch.special.entr(p).sum(-1).mean()) for name, p in self.grouping_probabilities().items()}

    def architecture(self) -> dict:
        """The learned architecture: per SFG layer the argmax group of every kernel."""
        groups = [*self.task_names, "shared"]
        layers = []
        for name, p in self.grouping_probabilities().items():
            idx = p.argmax(-1)
            layers.append(
                {
                    "layer": name,
                    "kernels": int(p.shape[0]),
                    "assignment": idx.tolist(),
                    "proportions": dict(zip(groups, (torch.bincount(idx, minlength=len(groups)).float() / len(idx)).tolist())),
                    "probability_sums": dict(zip(groups, (p.sum(0) / p.shape[0]).tolist())),
                    "mean_entropy": float(torch.special.entr(p).sum(-1).mean()),
                }
            )
        return {"backbone": self.backbone_name, "sharing": self.name, "grouping": self.grouping, "groups": groups, "layers": layers}

    def export_architecture(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.architecture(), f, indent=2)
