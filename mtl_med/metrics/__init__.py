"""mtl_med.metrics"""

from .multitask import (
    binary_classification_metrics,
    delta_m,
    multitask_metrics,
    regression_metrics,
    summarize_runs,
    write_summary_json,
    write_task_csv,
)
from .medical import (
    case_metrics,
    dice_per_label,
    psnr,
    region_mae,
    region_psnr,
    summarize_cases,
    write_case_csv,
    write_metrics_summary,
)
from .dense import DenseMeters, DepthMeter, NormalMeter, SegmentationMeter, dense_delta_m
from .stats import MeanCI, PairedTest, format_mean_std, mean_ci, paired_comparison, sample_std, seeds_needed
