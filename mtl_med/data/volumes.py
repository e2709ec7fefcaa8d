"""In-memory volumes of any common kind as one MONAI MetaTensor with its RAS+ affine."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from mtl_med.data.nifti import check_claimed_size, source_name
from mtl_med.errors import InputError

__all__ = ["as_metatensor"]


def as_metatensor(obj: Any, affine: Any = None, name: str = "<in-memory volume>") -> MetaTensor:
    """An in-memory 3D volume as a channel-first MetaTensor with its RAS+ affine (nibabel's world): a numpy
    array or tensor (``affine``, identity when None), a nibabel image, a MONAI MetaTensor (its affine; LPS
    ones converted) or a SimpleITK image (its direction, spacing and origin, LPS -> RAS). No file is written.

    Raises:
        InputError: naming ``name`` when the object is not a 3D volume or its affine is unusable.
    """
    import nibabel as nib
    from monai.data.utils import orientation_ras_lps

    meta: dict = {}
    if isinstance(obj, MetaTensor):
        arr = obj.detach().cpu().as_tensor()
        aff = np.asarray(obj.affine, float) if affine is None else np.asarray(affine, float)
        if affine is None and str(obj.meta.get("space", "RAS")).upper() == "LPS":
            aff = np.asarray(orientation_ras_lps(aff), float)
        name = source_name(obj, name)
    elif isinstance(obj, (nib.Nifti1Image, nib.Nifti2Image)):
        if nib.is_proxy(obj.dataobj):  # still on disk: its header's claim is checked before the read
            check_claimed_size(obj.get_filename() or name, obj.header.get_data_shape(), obj.get_data_dtype())
        arr, aff = np.asanyarray(obj.dataobj), obj.affine
        meta["original_affine"] = np.asarray(obj.affine, float)
    elif type(obj).__module__.startswith("SimpleITK"):
        import SimpleITK as sitk

        if obj.GetDimension() != 3 or obj.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(name, f"expected a scalar 3D SimpleITK image, got {obj.GetDimension()}D "
                                   f"with {obj.GetNumberOfComponentsPerPixel()} components")
        arr = np.transpose(sitk.GetArrayFromImage(obj), (2, 1, 0))  # SimpleITK arrays are (z, y, x)
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(obj.GetDirection(), float).reshape(3, 3) @ np.diag(obj.GetSpacing())
        lps[:3, 3] = obj.GetOrigin()
        aff = np.asarray(orientation_ras_lps(lps), float)
    elif isinstance(obj, (np.ndarray, torch.Tensor)):
        arr = obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj
        aff = np.eye(4) if affine is None else np.asarray(affine, float)
    else:
        raise InputError(name, f"cannot use a {type(obj).__name__} as a volume: give a file path, a numpy array "
                               "(with an affine), a nibabel image, a MONAI MetaTensor or a SimpleITK image")
    t = torch.as_tensor(np.asarray(arr, dtype=np.float32) if not isinstance(arr, torch.Tensor) else arr.float())
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise InputError(name, f"expected a 3D volume, got shape {tuple(t.shape)}")
    aff = np.asarray(aff, float)
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(name, "invalid affine (not a finite, non-singular 4x4 voxel-to-world matrix)")
    meta.update({"filename_or_obj": name, "space": "RAS"})
    meta.setdefault("original_affine", aff)
    return MetaTensor(t[None].contiguous(), affine=torch.as_tensor(aff, dtype=torch.float64), meta=meta)
