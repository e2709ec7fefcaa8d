"""mtl_med.data: readers and checks for the vision and pelvis data, and the synthetic pelvis phantoms.

The phantom constants (``PRESETS``, ``TISSUES``, ``CT_HU``, ``MR_T2``, ...) stay in :mod:`mtl_med.data.phantoms`
(``from mtl_med.data.phantoms import PRESETS``); the functions and :class:`Phantom` are exported here.
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
from .phantoms import (
    Phantom,
    generate_dataset,
    generate_phantom,
    grid_affine,
    split_cases,
    write_phantom,
)
