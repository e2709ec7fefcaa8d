"""Posterior sampling and whole-volume inference."""

from .posterior import PosteriorAggregator, sample_posterior, sampling_mode
