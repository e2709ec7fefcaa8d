"""mtl_med.data"""

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
    LABEL_TABLE,
    InputError,
    atomic_save_nifti,
    atomic_write,
    atomic_write_json,
    check_array,
    check_case,
    check_datalist,
    check_overlap,
    check_volume,
)
