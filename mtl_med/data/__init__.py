"""mtl_med.data: readers and checks for the vision and medical data (NIfTI volumes, DICOM series, datalists).

The synthetic pelvis phantoms belong to the pelvis application: :mod:`mtl_med.pelvis.phantoms`.
"""

from mtl_med.errors import InputError

from .vision import (
    MultiTaskImageDataset,
    VisionFileNotFoundError,
    VisionFormatError,
    load_digits_tasks,
    read_celeba,
    read_cifar10,
    read_cub,
    read_mnist,
    read_utkface,
)
from .nifti import (
    check_array,
    check_case,
    check_datalist,
    check_overlap,
    check_volume,
)
