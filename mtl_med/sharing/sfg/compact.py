"""The exact compacted forward pass of an SFG network for hard (one-hot) group assignments.

The dense forward (:mod:`mtl_med.sharing.sfg.network`, section 3.1 as the paper implements it) convolves every one
of the ``T + 1`` streams with every kernel and masks afterwards. With a hard assignment the streams are
disjoint in channels, so one tensor ``A`` holds them all (``A[C_g] = F_g[C_g]``) and each group's output
channels can be computed from that group's inputs alone:

* SFG layer: ``G_t``'s kernels convolve ``A[C_t | C_s]``, ``G_s``'s convolve ``A[C_s]`` (``F_t + F_s`` is
  zero elsewhere). The "concat" merge (a 1x1 convolution per task) is folded into ``G_t``'s kernels and the
  group's batch-norm into its kernels and a bias (exact in real arithmetic: no bias before, zero padding).
* Residual tower of group ``g`` (full-width HighResNet blocks, masked after the tower): its first block's
  input is zero outside ``C_g``, so the first convolution reads only ``C_g`` plus the constant that
  pre-activation makes of the zero channels (one extra input channel of ones, weighted by that constant);
  only the ``C_g`` outputs of the last convolution are kept. Middle convolutions stay full width: a tower
  run narrow would be another model. An empty group skips its tower.
* Each task head reads ``F_t + F_s`` scattered back to the original channel order.

Channels are kept sorted by group in the order ``[G_1, G_s, G_2, G_3, ...]`` so that, for two tasks, every
group's input is one contiguous slice. Assignments drawn per example (the sampler's copies) are grouped by
identical assignment; distinct ones run one call each, of at most :func:`rows_per_call` images, which keeps
an image's activations in cache on a CPU.

The results equal the dense path's to float32 rounding (tested, 2D / 3D, T = 2, 3, every grouping of
:data:`~mtl_med.sharing.sfg.layers.SHARING_MODES`). ``dtype`` / ``channels_last`` run the same pass in bfloat16 or
float16 (the kernels and the elementwise work in that dtype; the heads in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import SFGConv, _channel_mask
from mtl_med.networks.blocks import HighResBlock
from mtl_med.networks.heads import DenseHeads
from mtl_med.networks.receptive import CropPlan, conv_radius, convs_unsupported, crop_of, take
from mtl_med.networks.utils import unwrap

__all__ = ["CompactSFG", "compact_unsupported", "crop_unsupported", "plan_crop", "dense_cropped", "rows_per_call"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU)


def rows_per_call(shape, channels: int, budget: int = 1 << 22) -> int:
    """Images per convolution call so that one activation (``channels`` x spatial) stays within ``budget``
    elements (4 M: 16 MB in float32, about a CPU's L2 + L3 share); at least one. One 354 x 354 slice at 64
    channels is already 8 M, so a full-size pelvis slice runs alone."""
    n = int(torch.Size(shape).numel()) * int(channels)
    return max(1, budget // max(n, 1))


def _norm_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None and not m.training)


def _act_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.PReLU) or (not any(True for _ in m.parameters()) and not isinstance(m, _NOT_ELEMENTWISE))


def compact_unsupported(network: nn.Module) -> str | None:
    """Why ``network`` cannot run compacted (then the dense path runs), or ``None``."""
    net = unwrap(network)
    if not hasattr(net, "sfg_layers") or not hasattr(net, "layers"):
        return "not an SFG network"
    if net.training:
        return "the network is training (relaxed, straight-through samples)"
    if net._forward_pre_hooks or net._forward_hooks:
        return "the network has forward hooks (e.g. upsampled heads recording the input size) the compacted pass would skip"
    if getattr(net, "bn_inference", "population") == "batch":
        return "batch-norm uses test-batch statistics (A.4): copies with different assignments would mix"
    for name, layer in net.sfg_layers():
        g = layer.groups
        if g.assignment is None and g.inference == "relaxed":
            return f"{name} draws relaxed (soft) assignments"
        if layer.conv.padding_mode != "zeros":
            return f"{name} pads with {layer.conv.padding_mode!r}"
        for post in layer.post:
            norm, act = getattr(post, "N", nn.Identity()), getattr(post, "A", nn.Identity())
            if not (_norm_ok(norm) and _act_ok(act)) or any(k not in ("N", "A") for k, _ in post.named_children()):
                return f"{name} has a normalisation or activation the compacted pass does not fold"
    return None


def crop_unsupported(network: nn.Module) -> str | None:
    """Why an SFG network's passes cannot be computed on their receptive-field regions (:func:`plan_crop`;
    then they run whole and are cropped), or ``None``."""
    net = unwrap(network)
    if not hasattr(net, "sfg_layers") or not hasattr(net, "layers"):
        return "not an SFG network"
    if net.training or getattr(net, "bn_inference", "population") == "batch":
        return "the network is training or normalises with test-batch statistics"
    if net._forward_pre_hooks or net._forward_hooks:
        return "the network has forward hooks"
    if not isinstance(net.heads, DenseHeads):
        return "its heads are not 1x1 dense heads (pooled or upsampled heads see the whole frame)"
    for layer in net.layers:
        if isinstance(layer, SFGConv):
            convs = [layer.conv, *(layer.merges or [])]
            if not all(_norm_ok(getattr(p, "N", nn.Identity())) and _act_ok(getattr(p, "A", nn.Identity())) for p in layer.post):
                return "an SFG layer's normalisation or activation is not elementwise"
        elif isinstance(layer, nn.ModuleList):
            blocks = [b for tower in layer for b in tower]
            if not all(type(b) is HighResBlock and _norm_ok(b.norm1) and _norm_ok(b.norm2) and _act_ok(b.act1) and _act_ok(b.act2) for b in blocks):
                return "a residual tower holds blocks other than HighResNet's with elementwise layers"
            convs = [c for b in blocks for c in (b.conv1, b.conv2)]
        else:
            return "the network pools (the regions would change resolution)"
        reason = convs_unsupported(convs)
        if reason:
            return reason
    return None


def plan_crop(network: nn.Module, crop, spatial_dims: int | None = None) -> CropPlan:
    """The regions of every convolution of an SFG network whose outputs are kept at ``crop`` (one int or one
    per spatial dim): the heads are 1x1, each SFG layer (its 1x1 merges ahead of it) and each group's tower
    on the longest path."""
    net = unwrap(network)
    n = int(spatial_dims or net.spatial_dims)
    plan = CropPlan(crop, n)
    after = (0,) * n
    for layer in reversed(list(net.layers)):
        if isinstance(layer, SFGConv):
            after = plan.add(layer.conv, after)
            for m in layer.merges or []:
                plan.add(m, after)
        else:
            ends = []
            for tower in layer:
                a = after
                for blk in reversed(list(tower)):
                    a = plan.add(blk.conv1, plan.add(blk.conv2, a))
                ends.append(a)
            after = tuple(max(v) for v in zip(*ends))
    return plan


@torch.no_grad()
def dense_cropped(network: nn.Module, x: torch.Tensor, crop, generator: torch.Generator | None = None,
                  plan: CropPlan | None = None) -> dict[str, torch.Tensor]:
    """The SFG network's own (dense) forward ``network(x, generator=generator)`` cropped by ``crop`` on every
    spatial side, every convolution computed on its region only (:mod:`mtl_med.networks.receptive`); the same
    draws in the same order. Equal to the full pass, cropped, to float rounding."""
    reason = crop_unsupported(network)
    if reason:
        raise ValueError(f"receptive-field cropping cannot run this network: {reason}")
    net = unwrap(network)
    frame = tuple(x.shape[2:])
    plan = plan or plan_crop(net, crop, x.ndim - 2)
    T, feats, z = net.num_tasks, x, None
    for layer in net.layers:
        if isinstance(layer, SFGConv):
            inputs = layer._inputs(feats)  # the merges are 1x1: the inputs keep their region
            batch = inputs[0].shape[0]
            if layer.first:
                ys = [plan.module(layer.conv, inputs[0], frame)] * (T + 1)
            else:
                ys = plan.module(layer.conv, torch.cat(inputs, 0), frame).split(batch, 0)
            z = layer.groups(batch, generator)
            feats = [_channel_mask(z, g, net.spatial_dims) * h(y) for g, (h, y) in enumerate(zip(layer.post, ys))]
        else:
            feats = [_channel_mask(z, g, net.spatial_dims) * _block_chain(tower, f, frame, plan) for g, (tower, f) in enumerate(zip(layer, feats))]
    shared = feats[T]
    return {name: net.heads(feats[t] + shared, t) for t, name in enumerate(net.task_names)}


def _block_chain(tower: nn.Sequential, x: torch.Tensor, frame, plan: CropPlan) -> torch.Tensor:
    for b in tower:
        h = plan.module(b.conv1, b.act1(b.norm1(x)), frame)
        r = plan.module(b.conv2, b.act2(b.norm2(h)), frame)
        x = b.combine(r, take(x, frame, crop_of(frame, r)))
    return x


def _affine(norm: nn.Module, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval batch-norm as ``x * scale + shift`` (float32)."""
    if isinstance(norm, nn.Identity):
        return torch.ones(channels, device=device), torch.zeros(channels, device=device)
    scale = torch.rsqrt(norm.running_var.float() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.float()
    shift = -norm.running_mean.float() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    return scale, shift


def _act_weight(act: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """PReLU's slopes of channels ``ids`` (one slope broadcasts); ``None`` for other activations."""
    if not isinstance(act, nn.PReLU):
        return None
    w = act.weight
    return w if w.numel() == 1 else w[ids]


def _view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``B, C, *spatial``."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _rows(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-output-channel vector shaped to scale a kernel tensor ``(out, in, *k)``."""
    return v.reshape(-1, *([1] * (ndim - 1)))


class CompactSFG:
    """An SFG network's exact compacted forward for hard assignments (see the module docstring).

    ``engine(x, generator, copies=k)`` draws the assignments exactly as ``network(x.repeat(k, ...),
    generator=generator)`` would (same generator calls, in the same order) and returns the same
    ``{task: output}`` (float32), ``k * B`` rows in the order of ``repeat``.

    Args:
        network: an SFG network (or a wrapper with ``.module``) in eval mode; :func:`compact_unsupported`
            says why one is refused.
        dtype: compute dtype of the convolutions and the elementwise work (default float32).
        channels_last: activations in channels-last memory format (what oneDNN's bfloat16 kernels want).
        max_rows: images per call (default :func:`rows_per_call` of the input).
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False, max_rows: int | None = None):
        reason = compact_unsupported(network)
        if reason:
            raise ValueError(f"the compacted SFG pass cannot run this network: {reason}")
        self.net = unwrap(network)
        self.dtype, self.channels_last, self.max_rows = dtype, bool(channels_last), max_rows
        T = self.T = self.net.num_tasks
        self.order = [0, T, *range(1, T)]  # [G_1, G_s, G_2, ...]: G_1 | G_s and G_s | G_2 contiguous
        self.rank = torch.empty(T + 1, dtype=torch.long)
        self.rank[torch.tensor(self.order)] = torch.arange(T + 1)
        self.conv = _CONV[self.net.spatial_dims]
        self.sfg = [m for _, m in self.net.sfg_layers()]
        self._plan: CropPlan | None = None  # while a cropped pass runs: its regions and frame
        self._frame: tuple[int, ...] = ()
        self.macs = 0  # convolution MACs of the cropped passes so far (their plans count them)
        self._prepared: dict = {}  # per module: kernels with batch-norm folded, in float32 and the compute dtype

    # ---- assignments
    def draw(self, rows: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Group indices of every SFG layer, ``(K,)`` (one draw) or ``(rows, K)`` (per example), drawn
        with the calls the dense forward makes."""
        return [m.groups(rows, generator).argmax(-1) for m in self.sfg]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, copies: int = 1, crop=None) -> dict[str, torch.Tensor]:
        """``crop`` (an int or one per spatial dim): return the outputs cropped by that on every side, each
        convolution computed on its receptive-field region only (:func:`plan_crop`; :func:`crop_unsupported`
        says where that cannot run)."""
        rows = x.shape[0] * int(copies)
        return self.forward_assigned(x, self.draw(rows, generator), copies, crop=crop)

    def dense(self, x: torch.Tensor, generator: torch.Generator | None = None, copies: int = 1, crop=None) -> dict[str, torch.Tensor]:
        """The network's own (dense) forward of ``copies`` repeats of ``x``, cropped by ``crop`` on its regions
        (:func:`dense_cropped`): the dense sampler's pass with receptive-field cropping."""
        batch = x.repeat(int(copies), *([1] * (x.ndim - 1)))
        plan = plan_crop(self.net, crop or 0, x.ndim - 2)
        out = dense_cropped(self.net, batch, crop or 0, generator, plan)
        self.macs += plan.macs
        return out

    @torch.no_grad()
    def forward_assigned(self, x: torch.Tensor, assignment: list[torch.Tensor], copies: int = 1, crop=None) -> dict[str, torch.Tensor]:
        """Outputs for given group indices (one ``(K,)`` or ``(rows, K)`` tensor per SFG layer), cropped by
        ``crop`` (see :meth:`__call__`)."""
        if crop is not None:
            reason = crop_unsupported(self.net)
            if reason:
                raise ValueError(f"receptive-field cropping cannot run this network: {reason}")
            self._plan, self._frame = plan_crop(self.net, crop, x.ndim - 2), tuple(x.shape[2:])
        try:
            return self._forward_assigned(x, assignment, copies)
        finally:
            if self._plan is not None:
                self.macs += self._plan.macs
            self._plan, self._frame = None, ()

    def _forward_assigned(self, x, assignment, copies):
        b = x.shape[0]
        rows = b * int(copies)
        key = torch.cat([(a if a.ndim == 2 else a.expand(rows, -1)).to(torch.int16).cpu() for a in assignment], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True) if rows > 1 else (key, torch.zeros(1, dtype=torch.long))
        widths = [a.shape[-1] for a in assignment]
        step = self.max_rows or rows_per_call(x.shape[2:], max(m.out_channels for m in self.sfg))
        out: dict[str, torch.Tensor] = {}
        for u in range(uniq.shape[0]):
            idx = [c.long() for c in uniq[u].split(widths)]
            members = (inverse == u).nonzero(as_tuple=True)[0]
            for chunk in members.split(step):
                y = self.single(x[(chunk % b).to(x.device)], idx)
                for name, v in y.items():
                    if name not in out:
                        out[name] = v.new_empty((rows, *v.shape[1:]))
                    out[name][chunk.to(v.device)] = v
        return out

    def crop_unsupported(self) -> str | None:
        """Why this network's passes cannot be cropped to their receptive fields (:func:`crop_unsupported`)."""
        return crop_unsupported(self.net)

    def cost(self, spatial, crop=0) -> dict[str, float]:
        """Estimated work of one image-pass on a frame of spatial size ``spatial`` whose outputs are kept at
        ``crop``, without running anything: convolution MACs and convolution calls of the dense forward
        (``dense_macs``, ``dense_calls``: the calls of one forward, shared by all the rows it carries) and of the
        compacted pass (``compact_macs``, ``compact_calls``: one assignment, its expected group sizes from the
        grouping probabilities, the argmax's in argmax mode). Needs stride-1 "same" convolutions (HighResNet)."""
        n = self.net.spatial_dims
        frame = [int(v) for v in (spatial if isinstance(spatial, (tuple, list, torch.Size)) else [spatial] * n)]
        plan = plan_crop(self.net, crop, n)

        def area(conv, before=False):
            want = plan.want(conv)
            if before:
                want = [max(0, w - r) for w, r in zip(want, conv_radius(conv))]
            return float(torch.tensor([f - 2 * w for f, w in zip(frame, want)]).prod())

        T, out = self.T, dict(dense_macs=0.0, dense_calls=0.0, compact_macs=0.0, compact_calls=0.0)
        sizes = None  # expected channels per group [G_1..G_T, G_s] of the previous SFG layer
        for layer in self.net.layers:
            if isinstance(layer, SFGConv):
                k = float(torch.tensor(layer.conv.kernel_size).prod())
                cin, cout, P = layer.in_channels, layer.out_channels, area(layer.conv)
                streams = 1 if layer.first else T + 1
                out["dense_macs"] += streams * cin * cout * k * P
                out["dense_calls"] += 1
                if layer.merges is not None:
                    out["dense_macs"] += T * 2 * cin * cin * area(layer.conv, before=True)
                    out["dense_calls"] += T
                g = layer.groups
                frac = torch.nn.functional.one_hot(g.probabilities.argmax(-1), T + 1).float() if g.inference == "argmax" else g.probabilities.float()
                new = (frac.sum(0) * 1.0).tolist()
                for grp in range(T + 1):
                    if new[grp] <= 0:
                        continue
                    width = cin if layer.first else (sizes[T] + (sizes[grp] if grp < T else 0))
                    out["compact_macs"] += new[grp] * width * k * P
                    out["compact_calls"] += 1
                sizes = new
            elif isinstance(layer, nn.ModuleList):
                for grp, tower in enumerate(layer):
                    blocks = list(tower)
                    for i, b in enumerate(blocks):
                        w, k = b.conv1.in_channels, float(torch.tensor(b.conv1.kernel_size).prod())
                        P1, P2 = area(b.conv1), area(b.conv2)
                        out["dense_macs"] += w * w * k * (P1 + P2)
                        out["dense_calls"] += 2
                        if sizes[grp] <= 0:
                            continue
                        first_in = sizes[grp] + 1 if i == 0 else w
                        last_out = sizes[grp] if i == len(blocks) - 1 else w
                        out["compact_macs"] += (first_in * w * P1 + w * last_out * P2) * k
                        out["compact_calls"] += 3 if i == 0 else 2
        return out

    # ---- one assignment
    def _order(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Channel ids sorted by group (in :attr:`order`) and the group sizes in that order."""
        k = idx.shape[0]
        perm = torch.argsort(self.rank[idx] * k + torch.arange(k))
        sizes = torch.bincount(idx, minlength=self.T + 1)[self.order].tolist()
        return perm, sizes

    def _spans(self, sizes: list[int]) -> dict[int, tuple[int, int]]:
        """Group -> (start, stop) of its channels in the sorted tensor."""
        spans, o = {}, 0
        for g, n in zip(self.order, sizes):
            spans[g] = (o, o + n)
            o += n
        return spans

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last and x.ndim in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return x

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        return self._cast(w)

    def _folded(self, key, make) -> tuple[torch.Tensor, torch.Tensor]:
        """A kernel tensor with its batch-norm folded, made once per engine (the network does not change while
        an engine lives: the sampler makes one per batch): float32 and cast to the compute dtype. Indexing
        commutes with the cast, so picking a group's rows and columns from the cast copy gives the same numbers
        as casting the picked float32 ones, without a cast per call."""
        if key not in self._prepared:
            w = make()
            self._prepared[key] = (w, w.to(self.dtype))
        return self._prepared[key]

    @staticmethod
    def _act(act: nn.Module, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = _act_weight(act, ids)
        return act(y) if w is None else F.prelu(y, w.to(y.dtype))

    def _run(self, x, w, b, m):
        if self._plan is not None:
            return self._plan.conv(x, self._frame, m, w, b, self.conv)
        return self.conv(x, w, b, m.stride, m.padding, m.dilation)

    def _fit(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``y`` cropped to the region of ``like`` (a residual's skip; unchanged outside a cropped pass)."""
        return y if self._plan is None else take(y, self._frame, crop_of(self._frame, like))

    def single(self, x: torch.Tensor, idx: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{task: output}`` of images ``x`` that share one assignment ``idx`` (group indices per SFG layer)."""
        dev = x.device
        a, perm, spans, j = None, None, None, 0
        x = self._cast(x)
        for layer in self.net.layers:
            if isinstance(layer, SFGConv):
                a, perm, spans = self._sfg(layer, idx[j].to(dev), x if layer.first else a, perm, spans)
                j += 1
            elif isinstance(layer, nn.ModuleList):  # towers
                a = torch.cat([self._tower(layer[g], a[:, s:e], perm[s:e]) for g, (s, e) in spans.items() if e > s], 1)
            else:
                a = layer.pool(a)
        feats = torch.zeros_like(a, memory_format=torch.contiguous_format).float()
        feats[:, perm] = a.float()
        last = idx[j - 1].to(dev)
        out = {}
        for t, name in enumerate(self.net.task_names):
            keep = (last == t) | (last == self.T)
            out[name] = self.net.heads(feats * _view(keep.float(), feats.ndim), t)
        return out

    def _sfg(self, layer: SFGConv, idx, a, perm_in, spans_in):
        dev = a.device
        perm, sizes = self._order(idx.cpu())
        perm = perm.to(dev)
        spans = self._spans(sizes)
        outs = {}
        for g, (s, e) in spans.items():
            if e == s:
                continue
            ids = perm[s:e]
            scale, shift = _affine(getattr(layer.post[g], "N", nn.Identity()), layer.out_channels, dev)
            W, Wc = self._folded((id(layer), g), lambda: layer.conv.weight.float() * _rows(scale, layer.conv.weight.ndim))
            w = Wc.index_select(0, ids)  # compute dtype; replaced by a float32 fold below where one is made
            if layer.first:
                inp = a
            else:
                groups = [g] if g == self.T else [g, self.T]
                parts = sorted((*spans_in[h], h) for h in groups if spans_in[h][1] > spans_in[h][0])
                if not parts:  # F_t + F_s is zero: the conv gives zero, the group its shifted constant
                    inp, w = a[:, :1] * 0, w[:, :1] * 0
                else:
                    cols = torch.cat([perm_in[p:q] for p, q, _ in parts])
                    contiguous = all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))
                    inp = a[:, parts[0][0]:parts[-1][1]] if contiguous else torch.cat([a[:, p:q] for p, q, _ in parts], 1)
                    if layer.merges is not None and g < self.T:
                        # fold the 1x1 merge of [F_t | F_s] (C_in x 2 C_in) into G_t's kernels
                        m = layer.merges[g].weight.float().flatten(1)
                        src = torch.cat([perm_in[p:q] + (layer.in_channels if h == self.T else 0) for p, q, h in parts])
                        w = torch.einsum("oc...,cj->oj...", W.index_select(0, ids), m[:, src])
                    else:
                        w = w.index_select(1, cols)
            y = self._run(inp, self._w(w), shift[ids].to(self.dtype), layer.conv)
            outs[g] = self._act(getattr(layer.post[g], "A", nn.Identity()), y, ids)
        a = torch.cat([outs[g] for g in self.order if g in outs], 1)
        return a, perm, spans

    def _tower(self, tower: nn.Sequential, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        blocks = list(tower)
        if not all(isinstance(b, HighResBlock) and _norm_ok(b.norm1) and _norm_ok(b.norm2) and _act_ok(b.act1) and _act_ok(b.act2) for b in blocks):
            return self._tower_dense(tower, x, ids)
        dev, n = x.device, ids.shape[0]
        width = blocks[0].conv1.in_channels
        rest = torch.ones(width, dtype=torch.bool, device=dev)
        rest[ids] = False
        rest = rest.nonzero(as_tuple=True)[0]
        q = torch.cat([ids, rest])  # the tower's channels, the group's first
        y, full = x, False
        for i, blk in enumerate(blocks):
            last = i == len(blocks) - 1
            s1, b1 = _affine(blk.norm1, width, dev)
            s2, b2 = _affine(blk.norm2, width, dev)
            w1, w1c = self._folded((id(blk.conv1), 0), lambda: blk.conv1.weight.float() * _rows(s2, blk.conv1.weight.ndim))
            w1c = w1c.index_select(0, q)
            if full:
                h = self._act(blk.act1, torch.addcmul(_view(b1[q], y.ndim).to(self.dtype), y, _view(s1[q], y.ndim).to(self.dtype)), q)
                h = self._run(h, self._w(w1c.index_select(1, q)), b2[q].to(self.dtype), blk.conv1)
            else:
                h = self._act(blk.act1, torch.addcmul(_view(b1[ids], y.ndim).to(self.dtype), y, _view(s1[ids], y.ndim).to(self.dtype)), ids)
                bias, v = b2[q], None
                if rest.numel():  # the zero channels are a constant after pre-activation: one channel of ones
                    c = self._act(blk.act1, _view(b1[rest], 3), rest).reshape(-1)
                    v = (w1.index_select(0, q).index_select(1, rest) * _view(c, w1.ndim)).sum(1, keepdim=True)
                    if self._plan is not None and not any(self._plan.padding(y, self._frame, blk.conv1)):
                        bias, v = bias + v.flatten(1).sum(1), None  # no zero padding in this region: ones everywhere
                h = self._run(h, self._w(w1c.index_select(1, ids)), bias.to(self.dtype), blk.conv1)
                if v is not None:
                    ones = torch.ones((1, 1, *y.shape[2:]), dtype=self.dtype, device=dev)
                    h = h + self._run(ones, self._w(v), None, blk.conv1)
            h = self._act(blk.act2, h, q)
            _, w2c = self._folded((id(blk.conv2), 0), lambda: blk.conv2.weight.float())
            r = self._run(h, self._w(w2c.index_select(0, q[:n] if last else q).index_select(1, q)), None, blk.conv2)
            y = self._fit(y, r)
            if last:
                y = r.add_(y[:, :n] if full else y)  # combine: r + s (r is this call's own tensor)
            elif full:
                y = r.add_(y)
            else:
                r[:, :n] += y
                y, full = r, True
        return y

    def _tower_dense(self, tower: nn.Sequential, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Any other residual block: the full-width tower on the scattered stream, the group's channels kept."""
        width = next(m for m in tower.modules() if isinstance(m, nn.modules.conv._ConvNd)).in_channels
        full = x.new_zeros((x.shape[0], width, *x.shape[2:]), dtype=torch.float32)
        full[:, ids] = x.float()
        return self._cast(tower(full)[:, ids])
