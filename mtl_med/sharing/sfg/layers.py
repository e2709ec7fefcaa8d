"""Stochastic Filter Groups (Bragman et al., ICCV 2019).

Every kernel of an SFG convolution belongs to one of ``T + 1`` groups, drawn from a learned
categorical distribution. Group order throughout the project: index ``t < T`` is the group
specific to task ``t`` (``G_1 .. G_T``), index ``T`` is the shared group ``G_s`` (the order of
eq. 2, ``z = [z_1, z_2, z_s]``; the paper's figures write ``[p_1, p_s, p_2]``).

Feature routing (section 3.1): the layer receives ``T + 1`` streams ``[F_1 .. F_T, F_s]``;
``G_t`` convolves ``[F_t | F_s]``, ``G_s`` convolves ``F_s`` alone, and ``G_t`` never sees ``F_u``
(``u != t``). Streams are dense tensors that are sparse in channels: the layer convolves with
all kernels and zeroes the channels of the other groups (as the paper implements it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN
from monai.networks.layers.factories import Conv
from torch import nn

from mtl_med.layers.gumbel import gumbel_softmax

__all__ = ["SHARING_MODES", "grouping_init", "StochasticFilterGroups", "SFGConv"]

# sfg: learned p (A.1); constant_mask / constant_p: the paper's own fixed groupings (section 4.1,
# Table 2 "MT-constant mask" (Fig. 3(i)) and "MT-constant p=[1/3,1/3,1/3]"). Its other baselines
# (single-task networks, MT-hard sharing, cross-stitch; A.4) are the registered methods
# single_task, hard_sharing and cross_stitch of mtl_med.sharing, not SFG groupings.
SHARING_MODES = ("sfg", "constant_mask", "constant_p")


def grouping_init(num_kernels: int, num_tasks: int, mode: str = "sfg", shared_init: float | str = 0.6) -> torch.Tensor:
    """Initial grouping probabilities ``(num_kernels, num_tasks + 1)`` for a sharing mode.

    - ``sfg``: every kernel ``p_s = shared_init`` and the rest split evenly over the tasks;
      A.1 initialises ``[p_1, p_s, p_2] = [0.2, 0.6, 0.2]``. The other starts of section 5.4:
      ``shared_init="dirichlet"`` draws each kernel's ``p`` from Dirichlet(1, .., 1) (torch's global
      generator), ``"constant_mask"`` starts the learned ``p`` from the constant mask.
    - ``constant_mask``: contiguous equal blocks fixed to each of the ``T + 1`` groups (Fig. 3(i)).
    - ``constant_p``: every kernel ``p = 1 / (T + 1)`` (MT-constant p).
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    groups = num_tasks + 1
    if mode == "sfg" and shared_init == "dirichlet":
        return torch.distributions.Dirichlet(torch.ones(groups)).sample((num_kernels,))
    if mode == "sfg" and shared_init == "constant_mask":
        return grouping_init(num_kernels, num_tasks, "constant_mask")
    if mode == "sfg":
        if not isinstance(shared_init, (int, float)) or not 0.0 <= shared_init <= 1.0:
            raise ValueError(f"shared_init must be in [0, 1], 'dirichlet' or 'constant_mask', got {shared_init!r}")
        row = torch.full((groups,), (1.0 - shared_init) / num_tasks)
        row[num_tasks] = shared_init
        return row.expand(num_kernels, groups).clone()
    if mode == "constant_p":
        return torch.full((num_kernels, groups), 1.0 / groups)
    if mode == "constant_mask":
        if num_kernels < groups:
            raise ValueError(f"{mode} needs at least {groups} kernels per layer, got {num_kernels}")
        block = torch.arange(num_kernels) * groups // num_kernels  # contiguous, sizes differ by at most 1
        return F.one_hot(block, groups).float()
    raise ValueError(f"unknown sharing mode {mode!r}; expected one of {SHARING_MODES}")


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class StochasticFilterGroups(nn.Module):
    """Grouping probabilities of one layer's kernels and the draws of group assignments.

    Args:
        num_kernels: kernels (output channels) of the layer.
        num_tasks: T; there are ``T + 1`` groups.
        p_init: initial probabilities ``(num_kernels, T + 1)`` (rows need not be normalised).
        learnable: learn ``p`` (SFG) or keep it fixed (the baselines).
        hard: straight-through one-hot samples during training (forward exactly sparse, gradient
            of the relaxed sample); ``False`` uses the soft relaxed sample in the forward pass.
        noise: ``"log_p"`` adds Gumbel noise to ``log p`` (the Gumbel-Softmax of Jang et al.);
            ``"p"`` adds it to the normalised ``p``, as the original NiftyNet code did.
        per_example: one assignment per example of the batch instead of one per forward pass
            (lets the S posterior samples of inference run as one batch).

    Learned probabilities are ``softplus(theta)`` normalised over the groups (A.1 keeps ``p``
    positive through a softplus). Outside training, ``inference`` picks the draw: ``"sample"``
    (an exact categorical draw, the default: the posterior is sampled, not collapsed),
    ``"relaxed"`` (a Gumbel-Softmax sample at the current ``tau``, as the original code tested)
    or ``"argmax"`` (the most probable group, deterministic).
    """

    def __init__(
        self,
        num_kernels: int,
        num_tasks: int = 2,
        p_init: torch.Tensor | Sequence | None = None,
        learnable: bool = True,
        hard: bool = True,
        noise: str = "log_p",
        per_example: bool = False,
    ):
        super().__init__()
        if noise not in ("log_p", "p"):
            raise ValueError(f"noise must be 'log_p' or 'p', got {noise!r}")
        p = grouping_init(num_kernels, num_tasks) if p_init is None else torch.as_tensor(p_init, dtype=torch.float32)
        if p.ndim == 1:
            p = p.expand(num_kernels, -1)
        if p.shape != (num_kernels, num_tasks + 1) or (p < 0).any() or (p.sum(-1) <= 0).any():
            raise ValueError(f"p_init must be non-negative of shape {(num_kernels, num_tasks + 1)}, got {tuple(p.shape)}")
        p = p / p.sum(-1, keepdim=True)
        self.num_kernels, self.num_tasks = num_kernels, num_tasks
        self.learnable, self.hard, self.noise, self.per_example = learnable, hard, noise, per_example
        if learnable:
            self.theta = nn.Parameter(_inverse_softplus(p.clamp_min(1e-6)))
        else:
            self.register_buffer("fixed_p", p)
        self.register_buffer("tau", torch.tensor(1.0))
        self.inference = "sample"
        self.assignment: torch.Tensor | None = None  # a fixed one-hot assignment overrides sampling

    @property
    def probabilities(self) -> torch.Tensor:
        """``p``, shape ``(num_kernels, T + 1)``, rows summing to one."""
        if not self.learnable:
            return self.fixed_p
        q = F.softplus(self.theta)
        return q / q.sum(-1, keepdim=True)

    def entropy(self) -> torch.Tensor:
        """``sum_k H(p_k)`` (the entropy term of eq. 5), with ``0 log 0 = 0``."""
        return torch.special.entr(self.probabilities).sum()

    def fix(self, assignment: torch.Tensor | None) -> None:
        """Use ``assignment`` (group indices ``(K,)`` or one-hot ``(K, T+1)``) instead of sampling."""
        if assignment is not None and assignment.ndim == 1:
            assignment = F.one_hot(assignment.long(), self.num_tasks + 1)
        self.assignment = None if assignment is None else assignment.float().to(self.tau.device)

    def forward(self, batch_size: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of group masks ``z``: ``(K, T+1)``, or ``(B, K, T+1)`` with ``per_example``."""
        if self.assignment is not None:
            return self.assignment
        p = self.probabilities
        shape = (batch_size, *p.shape) if self.per_example else p.shape
        mode = "relaxed" if self.training else self.inference
        if mode == "argmax":
            z = F.one_hot(p.argmax(-1), self.num_tasks + 1).to(p.dtype)
            return z.expand(shape) if self.per_example else z
        logits = (p.log() if self.noise == "log_p" else p).expand(shape)
        if mode == "sample":  # argmax(logits + g) is an exact categorical draw, whatever tau
            with torch.no_grad():
                return gumbel_softmax(logits, 1.0, hard=True, generator=generator)
        if mode == "relaxed":
            return gumbel_softmax(logits, self.tau, hard=self.hard, generator=generator)
        raise ValueError(f"inference must be 'sample', 'relaxed' or 'argmax', got {mode!r}")

    def extra_repr(self) -> str:
        return f"kernels={self.num_kernels}, tasks={self.num_tasks}, learnable={self.learnable}, hard={self.hard}, noise={self.noise!r}, per_example={self.per_example}"


def _channel_mask(z: torch.Tensor, group: int, spatial_dims: int) -> torch.Tensor:
    """The mask column of ``group`` shaped to broadcast over ``B, C, *spatial``."""
    m = z[..., group]
    m = m.unsqueeze(0) if m.ndim == 1 else m
    return m.reshape(*m.shape, *([1] * spatial_dims))


class SFGConv(nn.Module):
    """A convolution whose kernels are stochastically grouped, with the routing of section 3.1.

    ``forward`` takes the image (``first=True``) or the ``T + 1`` streams ``[F_1 .. F_T, F_s]``
    of the previous SFG layer and returns the ``T + 1`` streams of this one:
    ``F_g = z_g * h_g(M * U_g)`` with ``U_t = [F_t | F_s]``, ``U_s = F_s`` (``U_g = x`` in the first
    layer), one kernel tensor ``M`` shared by the groups (eq. 1) and a separate batch-norm and
    PReLU ``h_g`` per group (as the original code). The mask is applied after ``h_g``, so a
    channel outside group ``g`` is exactly zero in ``F_g`` whatever batch-norm's shift.

    Args:
        merge: how ``[F_t | F_s]`` is formed: ``"sum"`` for plain stacked layers, ``"concat"``
            (concatenation and a 1x1 convolution per task) where other transformations, such as
            residual blocks, sit between SFG layers (end of section 3.1).
        mode: a sharing mode of :data:`SHARING_MODES` that sets the initial / fixed ``p``.
        stride, padding: of the convolution (padding ``None``: "same" at stride 1).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_tasks: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        padding: int | None = None,
        first: bool = False,
        merge: str = "sum",
        mode: str = "sfg",
        shared_init: float | str = 0.6,
        hard: bool = True,
        noise: str = "log_p",
        per_example: bool = False,
        act: str | tuple = "prelu",
        norm: str | tuple = "batch",
    ):
        super().__init__()
        if merge not in ("sum", "concat"):
            raise ValueError(f"merge must be 'sum' or 'concat', got {merge!r}")
        self.spatial_dims, self.num_tasks, self.first, self.merge = spatial_dims, num_tasks, first, merge
        self.in_channels, self.out_channels = in_channels, out_channels
        conv = Conv[Conv.CONV, spatial_dims]
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.groups = StochasticFilterGroups(
            out_channels,
            num_tasks,
            grouping_init(out_channels, num_tasks, mode, shared_init),
            learnable=mode == "sfg",
            hard=hard,
            noise=noise,
            per_example=per_example,
        )
        self.post = nn.ModuleList(
            ADN(ordering="NA", in_channels=out_channels, act=act, norm=norm, norm_dim=spatial_dims)
            for _ in range(num_tasks + 1)
        )
        self.merges = (
            nn.ModuleList(conv(2 * in_channels, in_channels, 1, bias=False) for _ in range(num_tasks))
            if merge == "concat" and not first
            else None
        )

    def _inputs(self, x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.first:
            if not isinstance(x, torch.Tensor):
                raise TypeError("the first SFG layer takes one tensor")
            return [x] * (self.num_tasks + 1)
        if isinstance(x, torch.Tensor) or len(x) != self.num_tasks + 1:
            raise TypeError(f"an SFG layer after the first takes {self.num_tasks + 1} streams [F_1..F_T, F_s]")
        shared = x[self.num_tasks]
        if self.merges is None:
            tasks = [x[t] + shared for t in range(self.num_tasks)]
        else:
            tasks = [m(torch.cat([x[t], shared], 1)) for t, m in enumerate(self.merges)]
        return [*tasks, shared]

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
        return_mask: bool = False,
    ):
        inputs = self._inputs(x)
        batch = inputs[0].shape[0]
        if self.first:
            y = self.conv(inputs[0])
            ys = [y] * len(inputs)
        else:  # one convolution call for all streams: they share the kernels M
            ys = self.conv(torch.cat(inputs, 0)).split(batch, 0)
        z = self.groups(batch, generator)
        out = [_channel_mask(z, g, self.spatial_dims) * h(y) for g, (h, y) in enumerate(zip(self.post, ys))]
        return (out, z) if return_mask else out

    def kernel_norm(self) -> torch.Tensor:
        """``sum_k ||M_k||^2`` of this layer (the weight term of eq. 5)."""
        return self.conv.weight.pow(2).sum()

    def extra_repr(self) -> str:
        return f"first={self.first}, merge={self.merge!r}"

