"""Test-time posterior sampling of SFG networks (section 5, Tables 1-2: 50 stochastic passes;
mean of the regression outputs, mode of the labels).

One sampler, :class:`PosteriorSampler`, serves the Python API (:func:`sample_posterior`, a batch of
images) and the bundles (the "network" of a MONAI inferer over a whole volume). Samples are aggregated
on the fly by :class:`PosteriorAggregator` (running mean and variance, per-class vote counts), so memory
does not grow with the number of samples, and several samples run as one batch: with per-example
sampling each copy of the input gets its own group assignment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn
from torch.nn import functional as F

from mtl_med.pelvis import NUM_LABELS, SCT_TASK, SEG_TASK

__all__ = ["PosteriorAggregator", "PosteriorSampler", "sample_posterior", "sampling_mode", "uses_batch_statistics"]

MODES = ("sample", "argmax", "relaxed")


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
    """Put an SFG network in eval mode with the given assignment draws; restores afterwards."""
    net = getattr(model, "module", model)
    layers = [m.groups for _, m in net.sfg_layers()] if hasattr(net, "sfg_layers") else []
    saved = [(g.inference, g.per_example) for g in layers]
    was_training = model.training
    model.eval()
    if layers:
        net.set_inference(mode, per_example)
    try:
        yield model
    finally:
        for g, (inference, pe) in zip(layers, saved):
            g.inference, g.per_example = inference, pe
        model.train(was_training)


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` normalises with test-batch statistics (A.4). Its posterior passes must then
    run one at a time with one assignment for the whole batch, as the original implementation did:
    batch-norm statistics pooled over copies with different assignments would mix the samples."""
    return getattr(getattr(model, "module", model), "bn_inference", "population") == "batch"


class PosteriorSampler:
    """All posterior samples of a batch of images (slices or patches), aggregated on the fly.

    For a batch ``x`` of ``B`` images it runs :attr:`num_samples` stochastic passes, ``k = max_batch // B``
    copies of the batch per forward call, each copy with its own group assignment (``per_example``); a
    network that normalises with test-batch statistics (:func:`uses_batch_statistics`) runs one pass per call
    instead, one assignment for the whole batch. The passes feed one :class:`PosteriorAggregator`.

    * :meth:`sample` (what :func:`sample_posterior` calls): the posterior summary of a batch, the keys of
      :meth:`PosteriorAggregator.result`.
    * :meth:`run` with a MONAI inferer: the sampler is the inferer's network; for each batch of slices (or
      patches) :meth:`__call__` returns the stitchable maps of :meth:`PosteriorAggregator.maps`
      (``<reg>_mean``, ``<reg>_std``, ``<label>_votes``), so memory holds those maps, never S volumes.

    Args:
        network: multi-task network returning ``{task: tensor}``.
        num_samples: S posterior samples (section 5.2: 50); ``mode="argmax"`` is deterministic and makes one
            pass whatever is given (:attr:`num_samples` is then 1).
        max_batch: images per forward call (images x sample copies): the memory budget.
        mode: ``"sample"`` (posterior draws), ``"argmax"`` (deterministic: one pass, std 0) or ``"relaxed"``.
        regression: regression outputs; labels: label output -> number of classes (default ``{"seg": 6}``,
            the pelvis labels of :mod:`mtl_med.pelvis`).
        generator: random generator of the group draws (same seed, same samples).
        amp: autocast (CUDA only; ignored elsewhere).
        progress: a tqdm bar to advance by the number of image-passes done.
        margin: voxels of replicate padding around every spatial side of the input, cropped from the outputs.
            Training never puts a loss where a patch meets its zero padding (A.3), so the network's output near
            an image border is undefined; a margin of the receptive-field radius moves that border out of the
            image.
        forward: ``forward(network, batch, generator)`` replaces ``network(batch, generator=generator)``.
    """

    def __init__(
        self,
        network: nn.Module,
        num_samples: int = 50,
        *,
        max_batch: int = 64,
        mode: str = "sample",
        regression: Iterable[str] = (SCT_TASK,),
        labels: Mapping[str, int] | None = None,
        generator: torch.Generator | None = None,
        amp: bool = False,
        progress: Any = None,
        margin: int = 0,
        forward: Callable | None = None,
    ):
        if int(num_samples) < 1 or int(max_batch) < 1:
            raise ValueError(f"num_samples and max_batch must be >= 1, got {num_samples}, {max_batch}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'sample', 'argmax' or 'relaxed', got {mode!r}")
        if int(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.network = network
        self.requested_samples = int(num_samples)
        self.max_batch = int(max_batch)
        self.mode = mode
        self.regression = tuple(regression)
        self.labels = dict(labels if labels is not None else {SEG_TASK: NUM_LABELS})
        self.generator = generator
        self.amp = bool(amp)
        self.progress = progress
        self.margin = int(margin)
        self.forward = forward

    @property
    def num_samples(self) -> int:
        """The number of passes actually made: ``requested_samples``, or 1 in argmax mode."""
        return 1 if self.mode == "argmax" else self.requested_samples

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

    def _autocast(self, device: torch.device):
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _crop(self, out: dict[str, torch.Tensor], ndim: int) -> dict[str, torch.Tensor]:
        m = self.margin
        if not m:
            return out
        inner = (slice(None), slice(None), *[slice(m, -m)] * (ndim - 2))
        return {k: v[inner] for k, v in out.items()}

    @torch.no_grad()
    def aggregate(self, x: torch.Tensor) -> PosteriorAggregator:
        """Run the S passes over ``x`` (``B, C, *spatial``; margin-padded here) with the network as it is
        (see :meth:`sampling`) and return their aggregator (on the padded grid)."""
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        if self.margin:
            x = F.pad(x, [self.margin] * 2 * (x.ndim - 2), mode="replicate")
        b = x.shape[0]
        k_max = 1 if uses_batch_statistics(self.network) else max(1, self.max_batch // b)
        agg = PosteriorAggregator(self.regression, self.labels)
        with self._autocast(x.device):
            while agg.count < self.num_samples:
                k = min(k_max, self.num_samples - agg.count)
                batch = x.repeat(k, *([1] * (x.ndim - 1)))
                if self.forward is not None:
                    out = self.forward(self.network, batch, self.generator)
                else:
                    out = self.network(batch, generator=self.generator)
                agg.update({n: v.reshape(k, b, *v.shape[1:]) for n, v in out.items() if n in agg.names})
                if self.progress is not None:
                    self.progress.update(k * b)
        return agg

    # ---- the two uses
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inferer's network: stitchable maps (:meth:`PosteriorAggregator.maps`) of a batch."""
        return self._crop(self.aggregate(x).maps(), x.ndim)

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
            return self._crop(self.aggregate(x).result(), x.ndim)


@torch.no_grad()
def sample_posterior(
    model: nn.Module,
    x: torch.Tensor,
    num_samples: int = 50,
    samples_per_batch: int = 10,
    regression: Iterable[str] = (SCT_TASK,),
    labels: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
    forward: Callable | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """S stochastic passes over ``x``, ``samples_per_batch`` at a time, aggregated on the fly.

    Each chunk repeats the batch ``k`` times along dim 0 and draws one group assignment per
    copy, so the passes of a chunk run as a single forward call. ``forward(model, batch,
    generator)`` can replace ``model(batch, generator)`` (e.g. to use an inferer). ``options`` go
    to :class:`PosteriorSampler` (``mode``, ``margin``, ``amp``, ``progress``). Returns ``<reg>`` (mean),
    ``<reg>_std``, ``<label>`` (mode), ``<label>_disagreement`` and ``<label>_entropy``.
    """
    if num_samples < 1 or samples_per_batch < 1:
        raise ValueError(f"num_samples and samples_per_batch must be >= 1, got {num_samples}, {samples_per_batch}")
    sampler = PosteriorSampler(model, num_samples, max_batch=samples_per_batch * x.shape[0], regression=regression,
                               labels=labels, generator=generator, forward=forward, **options)
    return sampler.sample(x)
