"""Posterior sampling and whole-volume inference."""

from mtl_med.errors import CaseFailures

from .posterior import PosteriorAggregator, PosteriorSampler, sample_posterior, sampling_mode, uses_batch_statistics
from .checkpoint import load_checkpoint
from .export import ConcatTaskOutputs, ExportNetwork, export_onnx
from .cases import case_names, list_cases
from .publish import check_output_dir
from .maps import OutputMaps
from .writer import CaseWriter, check_dicom_outputs
from .evaluation import CaseMetrics, evaluate_cases, read_case_csv
from .predictor import VolumePredictor
from .bundle import Predictor, bundle_parser, predict_case
