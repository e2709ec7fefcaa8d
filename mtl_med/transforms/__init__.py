"""mtl_med.transforms: MONAI dictionary transforms and pipelines for the pelvis MR / CT data."""

from mtl_med.transforms.histogram import (
    DEFAULT_QUANTILES,
    HistogramStandardize,
    HistogramStandardized,
    apply_landmarks,
    learn_landmarks,
    load_landmarks,
    save_landmarks,
)
from mtl_med.transforms.intensity import CTToHUd, ScaleCTd, hu_to_network, network_to_hu
from mtl_med.transforms.io import AddMaskd, CheckedCompose, CheckGeometryd, CheckVolumesd, LoadVolumesd, unwrap_input_error
from mtl_med.transforms.landmarks import learn_from_datalist
from mtl_med.transforms.n4 import N4BiasFieldCorrection, N4BiasFieldCorrectiond, n4_bias_field, otsu_mask
from mtl_med.transforms.patches import (
    BATCH_SIZE,
    PADDED_SIZE_2D,
    PATCH_SIZE_2D,
    make_dataset,
    preprocess_transforms,
    train_patch_transforms,
)
from mtl_med.transforms.spatial import CANONICAL_AXCODES, DEFAULT_PIXDIM, invert_to_input, resample_transforms
