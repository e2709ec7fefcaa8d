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
