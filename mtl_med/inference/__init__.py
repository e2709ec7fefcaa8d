"""Posterior sampling and whole-volume inference."""

from mtl_med.errors import CaseFailures

from .posterior import PosteriorAggregator, PosteriorSampler, sample_posterior, sampling_mode, uses_batch_statistics
from .volume import (
    ConcatTaskOutputs,
    ExportNetwork,
    VolumePredictor,
    case_names,
    evaluate_cases,
    export_onnx,
    list_cases,
    load_checkpoint,
    read_case_csv,
)
from .bundle import Predictor, bundle_parser, predict_case
