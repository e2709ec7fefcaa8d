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

from .layers import SFGConv
from mtl_med.networks.blocks import HighResBlock
from mtl_med.networks.utils import unwrap

__all__ = ["CompactSFG", "compact_unsupported", "rows_per_call"]

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

    # ---- assignments
    def draw(self, rows: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Group indices of every SFG layer, ``(K,)`` (one draw) or ``(rows, K)`` (per example), drawn
        with the calls the dense forward makes."""
        return [m.groups(rows, generator).argmax(-1) for m in self.sfg]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, copies: int = 1) -> dict[str, torch.Tensor]:
        rows = x.shape[0] * int(copies)
        return self.forward_assigned(x, self.draw(rows, generator), copies)

    @torch.no_grad()
    def forward_assigned(self, x: torch.Tensor, assignment: list[torch.Tensor], copies: int = 1) -> dict[str, torch.Tensor]:
        """Outputs for given group indices (one ``(K,)`` or ``(rows, K)`` tensor per SFG layer)."""
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

    @staticmethod
    def _act(act: nn.Module, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = _act_weight(act, ids)
        return act(y) if w is None else F.prelu(y, w.to(y.dtype))

    def _run(self, x, w, b, m):
        return self.conv(x, w, b, m.stride, m.padding, m.dilation)

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
        W = layer.conv.weight.float()
        outs = {}
        for g, (s, e) in spans.items():
            if e == s:
                continue
            ids = perm[s:e]
            scale, shift = _affine(getattr(layer.post[g], "N", nn.Identity()), layer.out_channels, dev)
            w = W[ids] * _rows(scale[ids], W.ndim)
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
                        w = torch.einsum("oc...,cj->oj...", w, m[:, src])
                    else:
                        w = w[:, cols]
            y = self._run(inp, self._w(w), shift[ids].to(self.dtype), layer.conv)
            outs[g] = self._act(getattr(layer.post[g], "A", nn.Identity()), y, ids)
        if layer.cross_stitch is not None:
            mixed = layer.cross_stitch([outs[t].float() for t in range(self.T)])
            outs.update({t: self._cast(v) for t, v in enumerate(mixed)})
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
            w1 = blk.conv1.weight.float()[q] * _rows(s2[q], blk.conv1.weight.ndim)
            if full:
                h = self._act(blk.act1, torch.addcmul(_view(b1[q], y.ndim).to(self.dtype), y, _view(s1[q], y.ndim).to(self.dtype)), q)
                h = self._run(h, self._w(w1[:, q]), b2[q].to(self.dtype), blk.conv1)
            else:
                h = self._act(blk.act1, torch.addcmul(_view(b1[ids], y.ndim).to(self.dtype), y, _view(s1[ids], y.ndim).to(self.dtype)), ids)
                h = self._run(h, self._w(w1[:, ids]), b2[q].to(self.dtype), blk.conv1)
                if rest.numel():  # the zero channels are a constant after pre-activation: one channel of ones
                    c = self._act(blk.act1, _view(b1[rest], 3), rest).reshape(-1)
                    v = (w1[:, rest] * _view(c, w1.ndim)).sum(1, keepdim=True)
                    ones = torch.ones((1, 1, *y.shape[2:]), dtype=self.dtype, device=dev)
                    h = h + self._run(ones, self._w(v), None, blk.conv1)
            h = self._act(blk.act2, h, q)
            w2 = blk.conv2.weight.float()
            r = self._run(h, self._w(w2[q[:n] if last else q][:, q]), None, blk.conv2)
            if last:
                y = (y[:, :n] if full else y) + r  # combine: r + s
            elif full:
                y = y + r
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
