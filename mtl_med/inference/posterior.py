"""Test-time posterior sampling of stochastic multi-task networks (the SFG paper's section 5, Tables 1-2:
50 stochastic passes; mean of the regression outputs, mode of the labels).

One sampler, :class:`PosteriorSampler`, serves the Python API (:func:`sample_posterior`, a batch of
images) and the bundles (the "network" of a MONAI inferer over a whole volume). Samples are aggregated
on the fly by :class:`PosteriorAggregator` (running mean and variance, per-class vote counts), so memory
does not grow with the number of samples, and several samples run as one batch: with per-example
sampling each copy of the input gets its own group assignment. What is particular to a method reaches the
sampler through the network's hooks: ``sampling_state(mode, per_example)`` (how it draws at test time) and
``fast_sampler(mode, dtype, channels_last)`` (an exact faster engine, or ``None``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn
from torch.nn import functional as F

from mtl_med.networks.receptive import crop_unsupported as trunk_crop_unsupported
from mtl_med.networks.receptive import cropped_forward
from mtl_med.networks.utils import unwrap

__all__ = [
    "PosteriorAggregator",
    "PosteriorSampler",
    "sample_posterior",
    "sampling_mode",
    "uses_batch_statistics",
    "native_bfloat16",
    "compute_dtype",
    "engine_choice",
]

MODES = ("sample", "argmax", "relaxed")
ENGINES = ("auto", "compact", "dense")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# num_samples="auto": the stopping rule's defaults (see PosteriorSampler)
AUTO_MAX_SAMPLES, AUTO_MIN_SAMPLES = 50, 10
# the regression tolerance has no default: it is in the network's units of the caller's outputs (the pelvis bundle:
# 30 HU over its CT scale, under the 48 HU mean by which two 50-pass means of the demo weights differ with
# different seeds, so stopping moves the mean less than re-running the fixed 50 passes)
# 2% of the organ voxels: re-running the fixed 50 passes of the demo weights with another seed changes the
# modal label of 0.67% of all voxels, about 6% of the organ voxels (docs/performance.md)
AUTO_LABEL_TOL = 0.02
# engine="auto": the fixed cost of one convolution call in multiply-accumulates of work. The compacted pass
# makes about 60 calls per image-pass (one assignment per call), the dense forward 47 calls shared by every
# row it carries; any value between 7.5 M and 68 M reproduces earlier CPU figures (SFG-HighResNet 16/32/64:
# compacted 0.85x the dense sampler at 32 x 32, 1.5x faster at 96 x 96; docs/performance.md)
CALL_COST_MACS = 2.0e7


@functools.lru_cache(maxsize=1)
def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), read from the CPU's flags;
    elsewhere oneDNN emulates bfloat16 and it is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and bool({"amx_bf16", "avx512_bf16"} & set(flags))


def compute_dtype(dtype: str | torch.dtype, device: torch.device, amp: bool = False) -> torch.dtype:
    """The compute dtype of the posterior passes. ``"auto"``: float16 on CUDA with ``amp``, float32 otherwise
    on CUDA; on a CPU bfloat16 where :func:`native_bfloat16` (its cost on the demo weights over 50 passes:
    0.83 HU mean |sCT difference|, 0.007% modal labels changed, docs/performance.md), float32 elsewhere (emulated
    bfloat16 is slower). Nothing is measured at run time."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16 if amp else torch.float32
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def engine_choice(cost: Mapping[str, float], rows: int, call_cost: float = CALL_COST_MACS) -> str:
    """``"compact"`` or ``"dense"``: the cheaper per image-pass by a rule that measures nothing: convolution
    MACs plus ``call_cost`` per convolution call, the dense forward's calls shared by the ``rows`` (images x
    copies) of one call, the compacted pass's made per image-pass. ``cost`` is a fast engine's
    ``cost(spatial, crop)`` (``dense_macs``, ``dense_calls``, ``compact_macs``, ``compact_calls``)."""
    dense = cost["dense_macs"] + call_cost * cost["dense_calls"] / max(1, int(rows))
    compact = cost["compact_macs"] + call_cost * cost["compact_calls"]
    return "compact" if compact < dense else "dense"


class PosteriorAggregator:
    """Running statistics over posterior samples.

    Args:
        regression: names of regression outputs: mean and standard deviation (population,
            so a single sample has zero spread).
        labels: name -> number of classes of label outputs (logits, class on dim 1): the modal
            label, its disagreement ``1 - votes(mode) / S`` and the entropy of the vote
            frequencies (nats).

    ``update(outputs, stacked=True)`` takes tensors whose dim 0 holds several samples, e.g.
    ``(S_chunk, B, C, ...)``; with ``stacked=False`` a single sample ``(B, C, ...)``.
    ``count`` is the number of samples so far and ``votes[name]`` the per-class vote counts of a
    label output, ``(B, K, ...)`` int32.
    """

    def __init__(self, regression: Iterable[str] = (), labels: Mapping[str, int] | None = None):
        self.regression = tuple(regression)
        self.labels = dict(labels or {})
        if not self.regression and not self.labels:
            raise ValueError("nothing to aggregate: give regression and/or label output names")
        self.count = 0
        self.votes: dict[str, torch.Tensor] = {}
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.regression, *self.labels)

    def update(self, outputs: Mapping[str, torch.Tensor], stacked: bool = True) -> None:
        n = None
        for name in self.names:
            if name not in outputs:
                raise KeyError(f"output {name!r} missing; got {sorted(outputs)}")
            x = outputs[name] if stacked else outputs[name].unsqueeze(0)
            if n is not None and x.shape[0] != n:
                raise ValueError("every output must hold the same number of samples")
            n = x.shape[0]
            if name in self.regression:
                self._update_moments(name, x.float())
            else:
                k = self.labels[name]
                label = x.argmax(2) if x.shape[2] > 1 else (x[:, :, 0] > 0).long()
                votes = F.one_hot(label, k).sum(0).movedim(-1, 1).to(torch.int32)  # B, K, ...
                self.votes[name] = votes if name not in self.votes else self.votes[name] + votes
        self.count += n

    def _update_moments(self, name: str, x: torch.Tensor) -> None:
        # Chan et al.'s parallel update of mean and sum of squared deviations
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if name not in self._mean:
            self._mean[name], self._m2[name] = mean_b, m2_b
            return
        n_a = self.count
        delta = mean_b - self._mean[name]
        total = n_a + n_b
        self._mean[name] = self._mean[name] + delta * (n_b / total)
        self._m2[name] = self._m2[name] + m2_b + delta**2 * (n_a * n_b / total)

    def _check(self) -> None:
        if self.count == 0:
            raise RuntimeError("no samples were aggregated")

    def _std(self, name: str) -> torch.Tensor:
        return (self._m2[name] / self.count).clamp_min(0).sqrt()

    def frequencies(self, name: str) -> torch.Tensor:
        """Vote frequencies ``votes / S`` of a label output, float, one channel per class."""
        self._check()
        return self.votes[name].float() / self.count

    def result(self) -> dict[str, torch.Tensor]:
        """``<name>`` (mean) and ``<name>_std`` for regression outputs; ``<name>`` (mode, int64),
        ``<name>_disagreement`` and ``<name>_entropy`` for label outputs (class dim kept as 1)."""
        self._check()
        out = {}
        for name in self.regression:
            out[name] = self._mean[name]
            out[f"{name}_std"] = self._std(name)
        for name, votes in self.votes.items():
            freq = self.frequencies(name)
            out[name] = votes.argmax(1, keepdim=True)
            out[f"{name}_disagreement"] = 1.0 - freq.amax(1, keepdim=True)
            out[f"{name}_entropy"] = torch.special.entr(freq).sum(1, keepdim=True)
        return out

    def maps(self) -> dict[str, torch.Tensor]:
        """The maps an inferer can stitch (all linear in the samples' statistics): ``<name>_mean`` and
        ``<name>_std`` for regression outputs, ``<name>_votes`` (vote frequencies, one channel per class)
        for label outputs."""
        self._check()
        out = {}
        for name in self.regression:
            out[f"{name}_mean"], out[f"{name}_std"] = self._mean[name], self._std(name)
        for name in self.votes:
            out[f"{name}_votes"] = self.frequencies(name)
        return out


@contextlib.contextmanager
def sampling_mode(model: nn.Module, mode: str = "sample", per_example: bool = True):
    """Put a network in eval mode drawing as ``mode`` / ``per_example`` say (its ``sampling_state`` hook);
    restores both afterwards."""
    net = unwrap(model)
    state = getattr(net, "sampling_state", None)
    was_training = model.training
    model.eval()
    try:
        with state(mode, per_example) if callable(state) else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` normalises with test-batch statistics (A.4). Its posterior passes must then
    run one at a time with one assignment for the whole batch, as the original implementation did:
    batch-norm statistics pooled over copies with different assignments would mix the samples."""
    return getattr(unwrap(model), "bn_inference", "population") == "batch"


class PosteriorSampler:
    """All posterior samples of a batch of images (slices or patches), aggregated on the fly.

    For a batch ``x`` of ``B`` images it runs :attr:`num_samples` stochastic passes, ``k = max_batch // B``
    copies of the batch per step, each copy with its own group assignment (``per_example``); a network that
    normalises with test-batch statistics (:func:`uses_batch_statistics`) runs one pass per call instead,
    one assignment for the whole batch. The passes feed one :class:`PosteriorAggregator`.

    The passes run on the network's fast sampler (its ``fast_sampler`` hook; SFG's compacted pass: each
    group's kernels on its own inputs, the same numbers as the dense forward to float32 rounding, about half
    its FLOPs at the paper's initial ``p`` and a plain network's at hard sharing) wherever the network has
    one and allows it, else dense.

    * :meth:`sample` (what :func:`sample_posterior` calls): the posterior summary of a batch, the keys of
      :meth:`PosteriorAggregator.result`.
    * :meth:`run` with a MONAI inferer (``SliceInferer`` over slices, ``SlidingWindowInferer`` over 3D
      patches alike): the sampler is the inferer's network; for each batch of slices (or patches)
      :meth:`__call__` returns the stitchable maps of :meth:`PosteriorAggregator.maps` (``<reg>_mean``,
      ``<reg>_std``, ``<label>_votes``), so memory holds those maps, never S volumes.

    Args:
        network: multi-task network returning ``{task: tensor}``.
        num_samples: S posterior samples (section 5.2: 50), or ``"auto"``: passes until the stopping rule
            below holds, at most ``max_samples``; ``mode="argmax"`` is deterministic and makes one pass
            whatever is given (:attr:`num_samples` is then 1).
        max_batch: images per step (images x sample copies): the memory budget of the dense path; the
            compacted path runs each distinct assignment alone, a few images a call.
        mode: ``"sample"`` (posterior draws), ``"argmax"`` (deterministic: one pass, std 0) or ``"relaxed"``.
        regression: regression outputs; labels: label output -> number of classes. At least one output must be
            given (the pelvis bundle: ``("sct",)`` and ``{"seg": 6}``, from its config's ``task_names`` and
            ``num_classes``).
        generator: random generator of the group draws (same seed, same samples).
        amp: float16 autocast on CUDA (``dtype="auto"`` then means float16; ignored elsewhere).
        progress: a tqdm bar to advance by the number of image-passes done.
        margin: voxels of replicate padding around every spatial side of the input, cropped from the outputs.
            Training never puts a loss where a patch meets its zero padding (A.3), so the network's output near
            an image border is undefined; a margin of the receptive-field radius moves that border out of the
            image. The passes compute every layer only on the region the kept outputs need (exact; see
            :attr:`receptive_crop` and :mod:`mtl_med.networks.receptive`) where the network allows it.
        forward: ``forward(network, batch, generator)`` replaces ``network(batch, generator=generator)`` (and
            the compacted path).
        engine: ``"auto"`` (the fast sampler where the network's ``fast_sampler_unsupported`` allows it and
            :func:`engine_choice` finds it cheaper for the input's size: the dense forward for small images,
            whose compacted passes are dominated by one call per assignment), ``"compact"`` (an error where it
            cannot run) or ``"dense"`` (the network's own forward).
        dtype: ``"auto"`` (:func:`compute_dtype`), ``"float32"``, ``"bfloat16"`` or ``"float16"``: the
            compacted path computes in it; the dense path autocasts to it.
        channels_last: activations of the compacted path channels-last (default: on a CPU, and on CUDA in a
            reduced dtype).
        max_samples, min_samples: bounds of ``num_samples="auto"`` (50 and 10).
        regression_tol: ``"auto"`` stops when the root-mean-square over the image of the expected change of
            every regression mean, were the remaining passes up to ``max_samples`` made, is at most this
            (network units; required with ``"auto"`` and regression outputs; the pelvis bundle: 30 HU over its
            CT scale, ``regression_tol_hu``) ...
        label_tol: ... and the expected fraction of organ voxels (modal label not 0) whose modal label those
            passes would change is at most this (default 2%). See docs/performance.md.
    """

    def __init__(
        self,
        network: nn.Module,
        num_samples: int | str = 50,
        *,
        max_batch: int = 64,
        mode: str = "sample",
        regression: Iterable[str] = (),
        labels: Mapping[str, int] | None = None,
        generator: torch.Generator | None = None,
        amp: bool = False,
        progress: Any = None,
        margin: int = 0,
        forward: Callable | None = None,
        engine: str = "auto",
        dtype: str | torch.dtype = "auto",
        channels_last: bool | None = None,
        max_samples: int = AUTO_MAX_SAMPLES,
        min_samples: int = AUTO_MIN_SAMPLES,
        regression_tol: float | None = None,
        label_tol: float = AUTO_LABEL_TOL,
    ):
        self.adaptive = num_samples == "auto"
        if self.adaptive:
            if not 1 <= int(min_samples) <= int(max_samples):
                raise ValueError(f"num_samples='auto' needs 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
            num_samples = int(max_samples)
        elif isinstance(num_samples, str):
            raise ValueError(f"num_samples must be a positive integer or 'auto', got {num_samples!r}")
        if int(num_samples) < 1 or int(max_batch) < 1:
            raise ValueError(f"num_samples and max_batch must be >= 1, got {num_samples}, {max_batch}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'sample', 'argmax' or 'relaxed', got {mode!r}")
        if int(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not (isinstance(dtype, torch.dtype) or dtype == "auto" or dtype in DTYPES):
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        regression, labels = tuple(regression), dict(labels or {})
        if not regression and not labels:
            raise ValueError("nothing to sample: give regression and/or label output names")
        if self.adaptive and regression and regression_tol is None:
            raise ValueError("num_samples='auto' with regression outputs needs regression_tol (network units)")
        self.network = network
        self.requested_samples = int(num_samples)
        self.max_batch = int(max_batch)
        self.mode = mode
        self.regression = regression
        self.labels = labels
        self.generator = generator
        self.amp = bool(amp)
        self.progress = progress
        self.margin = int(margin)
        self.forward = forward
        self.engine, self.dtype, self.channels_last = engine, dtype, channels_last
        self.min_samples, self.label_tol = int(min_samples), float(label_tol)
        self.regression_tol = float(regression_tol) if regression_tol is not None else None
        self.passes: list[int] = []  # passes made for each batch since the last reset_passes()

    @property
    def num_samples(self) -> int:
        """The most passes made per batch: ``requested_samples`` (``max_samples`` with ``"auto"``), or 1 in
        argmax mode."""
        return 1 if self.mode == "argmax" else self.requested_samples

    def passes_used(self) -> dict[str, float]:
        """Passes made per batch since :meth:`reset_passes`: ``{"batches", "mean", "min", "max"}``."""
        if not self.passes:
            return {"batches": 0, "mean": 0.0, "min": 0, "max": 0}
        return {"batches": len(self.passes), "mean": sum(self.passes) / len(self.passes), "min": min(self.passes), "max": max(self.passes)}

    def reset_passes(self) -> None:
        self.passes = []

    # ---- the S-pass loop
    def sampling(self):
        """The network in this sampler's mode (eval, group draws per example unless batch statistics)."""
        return sampling_mode(self.network, self.mode, per_example=not uses_batch_statistics(self.network))

    @contextlib.contextmanager
    def _using(self, generator: torch.Generator | None, progress: Any) -> Iterator[None]:
        saved = self.generator, self.progress
        self.generator = generator if generator is not None else self.generator
        self.progress = progress if progress is not None else self.progress
        try:
            yield
        finally:
            self.generator, self.progress = saved

    def _autocast(self, device: torch.device, dtype: torch.dtype):
        if dtype != torch.float32 and device.type in ("cuda", "cpu"):
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    #: compute every layer only on the region the kept outputs need (:mod:`mtl_med.networks.receptive`) when a
    #: margin is cropped: exact (the full pass, cropped, to float rounding); False runs the whole frame
    receptive_crop = True

    def _fast(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, str | None]:
        """The network's fast engine object (or ``None``) and why there is none."""
        net = unwrap(self.network)
        unsupported = getattr(net, "fast_sampler_unsupported", None)
        reason = unsupported(self.mode) if callable(unsupported) else f"{type(net).__name__} has no fast posterior sampler"
        if reason is not None:
            return None, reason
        # channels-last: faster for oneDNN on a CPU in every dtype (measured, docs/performance.md), for CUDA's
        # tensor cores in reduced precision
        cl = self.channels_last if self.channels_last is not None else (device.type == "cpu" or dtype != torch.float32)
        return net.fast_sampler(self.mode, dtype=dtype, channels_last=cl), None

    def _compact(self, device: torch.device, dtype: torch.dtype, x: torch.Tensor | None = None, rows: int = 1) -> Callable | None:
        """The network's fast (compacted) engine for this call, or ``None`` for the dense path; with ``engine=
        "auto"`` and an input ``x`` (``rows`` images x copies per dense call), only where :func:`engine_choice`
        prefers it."""
        if self.engine == "dense" or self.forward is not None:
            return None
        fast, reason = self._fast(device, dtype)
        if reason is not None:
            if self.engine == "compact":
                raise ValueError(f"engine='compact' cannot run this network: {reason}")
            return None
        if self.engine == "auto" and x is not None and callable(getattr(fast, "cost", None)):
            try:
                cost = fast.cost(tuple(x.shape[2:]), self._crop_width(fast) or 0)
            except ValueError:  # strided or unpadded convolutions: no estimate, the fast engine as before
                return fast
            if engine_choice(cost, rows) == "dense":
                return None
        return fast

    def _crop_width(self, engine: Any = None) -> int | None:
        """The margin when the passes can be cropped to their receptive fields (:attr:`receptive_crop`; the
        fast ``engine``'s or the plain trunk's ``crop_unsupported`` says), else ``None``."""
        if not self.margin or not self.receptive_crop or self.forward is not None:
            return None
        check = getattr(engine, "crop_unsupported", None) if engine is not None else None
        if callable(check):
            return self.margin if check() is None else None
        return self.margin if trunk_crop_unsupported(self.network) is None else None

    def _dense_cropped(self, device: torch.device) -> Callable | None:
        """``fn(x, generator, copies)``: the network's own forward over ``copies`` repeats of ``x``, cropped by
        the margin on its receptive-field regions, or ``None`` (then the whole frame runs and is cropped)."""
        if not self.margin or not self.receptive_crop or self.forward is not None:
            return None
        m = self.margin
        if trunk_crop_unsupported(self.network) is None:
            return lambda x, g, k: cropped_forward(self.network, x.repeat(k, *([1] * (x.ndim - 1))), m)
        fast, _ = self._fast(device, torch.float32)
        if fast is not None and callable(getattr(fast, "dense", None)) and self._crop_width(fast):
            return lambda x, g, k: fast.dense(x, g, copies=k, crop=m)
        return None

    def _crop(self, out: dict[str, torch.Tensor], ndim: int, done: bool = False) -> dict[str, torch.Tensor]:
        """Outputs on the margin-padded grid cropped by the margin (``done``: already cropped by the passes)."""
        m = self.margin
        if not m or done:
            return out
        inner = (slice(None), slice(None), *[slice(m, -m)] * (ndim - 2))
        return {k: v[inner] for k, v in out.items()}

    @torch.no_grad()
    def aggregate(self, x: torch.Tensor) -> PosteriorAggregator:
        """Run the S passes over ``x`` (``B, C, *spatial``; margin-padded here) with the network as it is
        (see :meth:`sampling`) and return their aggregator: on the padded grid, or on ``x``'s own grid where the
        passes were cropped to their receptive fields (its ``cropped`` attribute says which)."""
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        if self.margin:
            x = F.pad(x, [self.margin] * 2 * (x.ndim - 2), mode="replicate")
        b = x.shape[0]
        k_max = 1 if uses_batch_statistics(self.network) else max(1, self.max_batch // b)
        dtype = compute_dtype(self.dtype, x.device, self.amp)
        engine = self._compact(x.device, dtype, x, k_max * b)
        crop = self._crop_width(engine) if engine is not None else None
        dense_cropped = self._dense_cropped(x.device) if engine is None else None
        agg = PosteriorAggregator(self.regression, self.labels)
        agg.cropped = bool(crop or dense_cropped)
        with contextlib.nullcontext() if engine is not None else self._autocast(x.device, dtype):
            while agg.count < self.num_samples:
                k = min(k_max, self.num_samples - agg.count)
                if self.adaptive and agg.count < self.min_samples:
                    k = min(k, self.min_samples - agg.count)
                if engine is not None:
                    out = engine(x, self.generator, copies=k, crop=crop) if crop else engine(x, self.generator, copies=k)
                elif dense_cropped is not None:
                    out = dense_cropped(x, self.generator, k)
                else:
                    batch = x.repeat(k, *([1] * (x.ndim - 1)))
                    if self.forward is not None:
                        out = self.forward(self.network, batch, self.generator)
                    else:
                        out = self.network(batch, generator=self.generator)
                agg.update({n: v.reshape(k, b, *v.shape[1:]) for n, v in out.items() if n in agg.names})
                if self.progress is not None:
                    self.progress.update(k * b)
                if self.adaptive and agg.count >= self.min_samples and self.settled(agg):
                    break
        self.passes.append(agg.count)
        return agg

    def settled(self, agg: PosteriorAggregator) -> bool:
        """The stopping rule of ``num_samples="auto"``: what the remaining ``R = N - S`` passes up to the
        maximum ``N`` would still change in what users read is within the tolerances.

        * Regression means: the ``N``-pass mean differs from the ``S``-pass mean by a Monte-Carlo error of
          variance ``sigma^2 R / (N S)`` per voxel; its root mean square over the image (``sigma^2`` the
          samples' variance) must be at most ``regression_tol``.
        * Modal labels: over the organ voxels (modal label not 0), a voxel whose leader has ``n1`` votes and
          runner-up ``n2`` changes label if the runner-up gains ``n1 - n2`` votes on it in ``R`` passes; with
          the vote frequencies ``p1, p2`` the gain is about normal, mean ``R (p2 - p1)``, variance
          ``R (p1 + p2)``. The mean of that probability over the organ voxels must be at most ``label_tol``.
        """
        s, n = agg.count, self.num_samples
        r = n - s
        if r <= 0:
            return True
        if self.regression and self.regression_tol is None:
            raise ValueError("num_samples='auto' with regression outputs needs regression_tol (network units)")
        for name in self.regression:
            var = agg._m2[name] / s
            if math.sqrt(float(var.mean()) * r / (n * s)) > self.regression_tol:
                return False
        for name, votes in agg.votes.items():
            top = votes.topk(2, dim=1).values.float() if votes.shape[1] > 1 else torch.cat([votes, 0 * votes], 1).float()
            organ = votes.argmax(1) != 0
            if not organ.any():
                continue
            n1, n2 = top[:, 0][organ], top[:, 1][organ]
            p1, p2 = n1 / s, n2 / s
            z = (n1 - n2 + r * (p1 - p2)) / (r * (p1 + p2)).clamp_min(1e-12).sqrt()
            flips = 0.5 * torch.erfc(z / math.sqrt(2.0))
            if float(flips.mean()) > self.label_tol:
                return False
        return True

    # ---- the two uses
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inferer's network: stitchable maps (:meth:`PosteriorAggregator.maps`) of a batch."""
        agg = self.aggregate(x)
        return self._crop(agg.maps(), x.ndim, agg.cropped)

    def run(self, inferer: Any, volume: torch.Tensor, *, generator: torch.Generator | None = None,
            progress: Any = None) -> dict[str, torch.Tensor]:
        """Stitched statistic maps of ``volume`` (1, C, *spatial) with the network in ``mode``;
        ``generator`` / ``progress`` replace the sampler's own for this run."""
        with self._using(generator, progress), self.sampling():
            return inferer(volume, self)

    def sample(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
               progress: Any = None) -> dict[str, torch.Tensor]:
        """Posterior summary of a batch ``x`` (:meth:`PosteriorAggregator.result`) with the network in
        ``mode``; ``generator`` / ``progress`` replace the sampler's own for this call."""
        with self._using(generator, progress), self.sampling():
            agg = self.aggregate(x)
            return self._crop(agg.result(), x.ndim, agg.cropped)


@torch.no_grad()
def sample_posterior(
    model: nn.Module,
    x: torch.Tensor,
    num_samples: int | str = 50,
    samples_per_batch: int = 10,
    regression: Iterable[str] = (),
    labels: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
    forward: Callable | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """S stochastic passes over ``x``, ``samples_per_batch`` at a time, aggregated on the fly.

    Each chunk repeats the batch ``k`` times along dim 0 and draws one group assignment per
    copy, so the passes of a chunk run as a single forward call. ``forward(model, batch,
    generator)`` can replace ``model(batch, generator)`` (e.g. to use an inferer). ``options`` go
    to :class:`PosteriorSampler` (``mode``, ``margin``, ``amp``, ``progress``); ``regression`` / ``labels`` name
    the outputs (at least one). Returns ``<reg>`` (mean),
    ``<reg>_std``, ``<label>`` (mode), ``<label>_disagreement`` and ``<label>_entropy``.
    """
    if (num_samples != "auto" and int(num_samples) < 1) or samples_per_batch < 1:
        raise ValueError(f"num_samples and samples_per_batch must be >= 1, got {num_samples}, {samples_per_batch}")
    sampler = PosteriorSampler(model, num_samples, max_batch=samples_per_batch * x.shape[0], regression=regression,
                               labels=labels, generator=generator, forward=forward, **options)
    return sampler.sample(x)
