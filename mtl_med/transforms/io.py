"""Loading with the project's input checks: every failure is an ``InputError`` naming the file."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, MapTransform

from mtl_med.data.nifti import check_array, check_overlap, source_name
from mtl_med.data.volumes import as_metatensor
from mtl_med.errors import InputError

__all__ = ["LoadVolumesd", "CheckVolumesd", "CheckGeometryd", "AddMaskd", "CheckedCompose", "unwrap_input_error"]

logger = logging.getLogger(__name__)


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
    volumes and out-of-table labels raise ``InputError`` naming the file. An "mr" or "ct" that is a DICOM
    series folder is read by :func:`mtl_med.data.dicom.load_series` (headers checked, MONAI's ``ITKReader``), so
    training and evaluation take DICOM wherever inference does.

    Whether or not ``check`` is set, each file's header is read first and a volume claiming more than
    ``max_voxels`` voxels or more bytes than the memory available is refused before any voxel is read
    (:func:`mtl_med.data.nifti.check_claimed_size`).

    Args:
        keys: keys holding file paths ("mr", "ct", "label", ...).
        check: run the checks (a second read of the header; the voxels are read once by the checks and once
            by MONAI, cheap next to N4).
        allow_missing_keys: skip keys absent from the item (inference-only items have no "ct" / "label").
        max_voxels: the most voxels a header may claim (None: ``$MTL_MED_MAX_VOXELS``, else 2^30).
        label_table: label value -> name, the values a "label" file may hold; required to check a "label".
    """

    def __init__(self, keys: KeysCollection = ("mr", "ct", "label"), check: bool = True,
                 allow_missing_keys: bool = True, max_voxels: int | None = None,
                 label_table: Mapping[int, Any] | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.check = check
        self.max_voxels = max_voxels
        self.label_table = label_table

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from mtl_med.data.nifti import DICOM_ROLES, check_volume, read_header

        d = dict(data)
        for key in self.key_iterator(d):  # a DICOM series folder (mr, ct): checked headers, then MONAI's ITK reader
            v = d[key]
            if isinstance(v, (str, os.PathLike)) and os.path.isdir(v):
                if key not in DICOM_ROLES:
                    raise InputError(v, f"{key} is a folder: only {sorted(DICOM_ROLES)} may be DICOM series; give {key} as a NIfTI file")
                from mtl_med.data.dicom import load_series

                d[key] = load_series(v, role=str(key), modality=DICOM_ROLES[key])
        files = [k for k in self.key_iterator(d) if isinstance(d[k], str) or hasattr(d[k], "__fspath__")]
        for key in self.key_iterator(d):  # volumes given in memory (see as_metatensor) are used as they are
            if key not in files and not isinstance(d[key], MetaTensor):
                d[key] = as_metatensor(d[key], name=f"<in-memory {key}>")
        for key in files:  # the header's claim first, the voxels after (a tiny file may claim terabytes)
            if self.check:
                check_volume(d[key], role=str(key), max_voxels=self.max_voxels, label_table=self.label_table)
            else:
                read_header(d[key], role=str(key), max_voxels=self.max_voxels)
        if not files:
            return d
        try:
            return LoadImaged(keys=files, reader="NibabelReader", ensure_channel_first=True, image_only=True)(d)
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
        label_table: label value -> name, the values a "label" volume may hold; required to check a "label".
    """

    def __init__(self, keys: KeysCollection = ("mr", "ct", "label"), min_overlap: float = 0.5,
                 allow_missing_keys: bool = True, label_table: Mapping[int, Any] | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_overlap = min_overlap
        self.label_table = label_table

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        geoms = {}
        for key in self.key_iterator(d):
            img = d[key]
            name = source_name(img, f"<{key}>")
            check_array(img, name, role=str(key), spatial_ndim=3, label_table=self.label_table)
            if isinstance(img, MetaTensor):
                geoms[str(key)] = (name, tuple(img.shape[-3:]), np.asarray(img.affine, float))
        check_overlap(geoms, min_overlap=self.min_overlap)
        return d


class CheckGeometryd(MapTransform):
    """Require ``keys`` (CT, labels) to lie on ``ref_key``'s grid (MR): same shape and an affine within
    ``atol`` mm. Evaluation compares voxel by voxel, so a reference on another grid would be compared after a
    silent resampling or padding; ``on_mismatch="resample"`` accepts it (the common-grid resampling then brings
    it onto the MR grid), logs a warning and lists the key in ``d["resampled_to_mr"]``.
    """

    def __init__(self, keys: KeysCollection = ("ct", "label", "bone"), ref_key: str = "mr", atol: float = 1e-3,
                 on_mismatch: str = "raise", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if on_mismatch not in ("raise", "resample"):
            raise ValueError(f'on_mismatch must be "raise" or "resample", got {on_mismatch!r}')
        self.ref_key, self.atol, self.on_mismatch = ref_key, float(atol), on_mismatch

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        ref_name = source_name(ref, f"<{self.ref_key}>")
        resampled = []
        for key in self.key_iterator(d):
            img = d[key]
            if key == self.ref_key or not isinstance(img, MetaTensor):
                continue
            diff = np.abs(np.asarray(img.affine, float) - np.asarray(ref.affine, float)).max()
            if tuple(img.shape[-3:]) == tuple(ref.shape[-3:]) and diff <= self.atol:
                continue
            name = source_name(img, f"<{key}>")
            problem = (f"{key} grid {tuple(img.shape[-3:])} does not match the MR {ref_name} grid "
                       f"{tuple(ref.shape[-3:])} (largest affine difference {diff:.3g} mm)")
            if self.on_mismatch == "raise":
                raise InputError(name, problem + "; resample it onto the MR grid or set truth_geometry to \"resample\"")
            logger.warning("%s: %s; resampling it onto the MR grid", name, problem)
            resampled.append(str(key))
        if resampled:
            d["resampled_to_mr"] = resampled
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

