"""Loading with the project's input checks: every failure is an ``InputError`` naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, MapTransform

from mtl_med.data.nifti import InputError, check_array, check_overlap, source_name

__all__ = ["LoadVolumesd", "CheckVolumesd", "AddMaskd", "CheckedCompose", "unwrap_input_error"]


def unwrap_input_error(err: BaseException) -> InputError | None:
    """The ``InputError`` behind MONAI's "applying transform ..." ``RuntimeError`` wrappers, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class CheckedCompose(Compose):
    """``Compose`` that re-raises a bad-input error as the ``InputError`` itself (naming the file) instead of
    MONAI's generic ``RuntimeError("applying transform ...")``."""

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause = unwrap_input_error(err)
            if cause is None:
                raise
            raise InputError(cause.path, cause.problem) from err


class LoadVolumesd(MapTransform):
    """``LoadImaged`` (NiBabel reader, channel first) that checks each file with
    :func:`mtl_med.data.nifti.check_volume` first, so unreadable, truncated, non-3D, empty or non-finite
    volumes and out-of-table labels raise ``InputError`` naming the file.

    Args:
        keys: keys holding file paths ("mr", "ct", "label", ...).
        check: run the checks (a second read of the header; the voxels are read once by the checks and once
            by MONAI, cheap next to N4).
        allow_missing_keys: skip keys absent from the item (inference-only items have no "ct" / "label").
    """

    def __init__(self, keys: KeysCollection = ("mr", "ct", "label"), check: bool = True,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.check = check
        self.loader = LoadImaged(keys=self.keys, reader="NibabelReader", ensure_channel_first=True,
                                 image_only=True, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from mtl_med.data.nifti import check_volume

        d = dict(data)
        if self.check:
            for key in self.key_iterator(d):
                if isinstance(d[key], (str,)) or hasattr(d[key], "__fspath__"):
                    check_volume(d[key], role=str(key))
        try:
            return self.loader(d)
        except InputError:
            raise
        except Exception as err:  # MONAI wraps reader errors in RuntimeError
            name = next((str(d[k]) for k in self.key_iterator(d) if isinstance(d[k], str)), "<datalist item>")
            raise InputError(name, f"cannot load volume ({type(err).__name__}: {err})") from err


class CheckVolumesd(MapTransform):
    """Check loaded (channel-first) volumes: finite, 3D, label values in the table, and all keys overlapping
    in physical space (from their affines).

    Args:
        keys: keys to check; each key's name is its role ("mr", "ct", "label", "bone", "body").
        min_overlap: see :func:`mtl_med.data.nifti.check_overlap`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection = ("mr", "ct", "label"), min_overlap: float = 0.5,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_overlap = min_overlap

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        geoms = {}
        for key in self.key_iterator(d):
            img = d[key]
            name = source_name(img, f"<{key}>")
            check_array(img, name, role=str(key), spatial_ndim=3)
            if isinstance(img, MetaTensor):
                geoms[str(key)] = (name, tuple(img.shape[-3:]), np.asarray(img.affine, float))
        check_overlap(geoms, min_overlap=self.min_overlap)
        return d


class AddMaskd(MapTransform):
    """Add ``mask_key``: ones with the geometry of ``ref_key``. Carried through crops, affine augmentation
    (nearest neighbour, zero fill) and padding, it ends up marking exactly the voxels that hold image data
    (A.3: the loss is computed only in non-padded regions)."""

    def __init__(self, ref_key: str = "mr", mask_key: str = "mask") -> None:
        super().__init__([ref_key], allow_missing_keys=False)
        self.ref_key = ref_key
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        ones = torch.ones((1, *ref.shape[1:]), dtype=torch.float32)
        d[self.mask_key] = MetaTensor(ones, meta=dict(ref.meta)) if isinstance(ref, MetaTensor) else ones
        return d

