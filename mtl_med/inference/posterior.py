"""Test-time posterior sampling of SFG networks (section 5, Tables 1-2: 50 stochastic passes;
mean of the regression outputs, mode of the labels).

Samples are aggregated on the fly (running mean and variance, per-label vote counts), so memory
does not grow with the number of samples, and several samples can run as one batch: with
per-example sampling each copy of the input gets its own group assignment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["PosteriorAggregator", "sample_posterior", "sampling_mode", "uses_batch_statistics"]


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
    """

    def __init__(self, regression: Iterable[str] = (), labels: Mapping[str, int] | None = None):
        self.regression = tuple(regression)
        self.labels = dict(labels or {})
        if not self.regression and not self.labels:
            raise ValueError("nothing to aggregate: give regression and/or label output names")
        self.count = 0
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}
        self._votes: dict[str, torch.Tensor] = {}

    def update(self, outputs: Mapping[str, torch.Tensor], stacked: bool = True) -> None:
        n = None
        for name in (*self.regression, *self.labels):
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
                votes = torch.nn.functional.one_hot(label, k).sum(0).movedim(-1, 1).to(torch.int32)  # B, K, ...
                self._votes[name] = votes if name not in self._votes else self._votes[name] + votes
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

    def result(self) -> dict[str, torch.Tensor]:
        """``<name>`` (mean) and ``<name>_std`` for regression outputs; ``<name>`` (mode, int64),
        ``<name>_disagreement`` and ``<name>_entropy`` for label outputs (class dim kept as 1)."""
        if self.count == 0:
            raise RuntimeError("no samples were aggregated")
        out = {}
        for name in self.regression:
            out[name] = self._mean[name]
            out[f"{name}_std"] = (self._m2[name] / self.count).clamp_min(0).sqrt()
        for name, votes in self._votes.items():
            freq = votes.float() / self.count
            out[name] = votes.argmax(1, keepdim=True)
            out[f"{name}_disagreement"] = 1.0 - freq.amax(1, keepdim=True)
            out[f"{name}_entropy"] = torch.special.entr(freq).sum(1, keepdim=True)
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


@torch.no_grad()
def sample_posterior(
    model: nn.Module,
    x: torch.Tensor,
    num_samples: int = 50,
    samples_per_batch: int = 10,
    regression: Iterable[str] = ("sct",),
    labels: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
    forward: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """S stochastic passes over ``x``, ``samples_per_batch`` at a time, aggregated on the fly.

    Each chunk repeats the batch ``k`` times along dim 0 and draws one group assignment per
    copy, so the passes of a chunk run as a single forward call. ``forward(model, batch,
    generator)`` can replace ``model(batch, generator)`` (e.g. to use an inferer).
    """
    if num_samples < 1 or samples_per_batch < 1:
        raise ValueError(f"num_samples and samples_per_batch must be >= 1, got {num_samples}, {samples_per_batch}")
    agg = PosteriorAggregator(regression, labels if labels is not None else {"seg": 6})
    call = forward or (lambda m, b, g: m(b, generator=g))
    batch_bn = uses_batch_statistics(model)
    with sampling_mode(model, "sample", per_example=not batch_bn):
        done = 0
        while done < num_samples:
            k = 1 if batch_bn else min(samples_per_batch, num_samples - done)
            out = call(model, x.repeat(k, *([1] * (x.ndim - 1))), generator)
            agg.update({n: v.reshape(k, x.shape[0], *v.shape[1:]) for n, v in out.items() if n in (*agg.regression, *agg.labels)})
            done += k
    return agg.result()
