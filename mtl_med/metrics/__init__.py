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
