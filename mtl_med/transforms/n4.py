"""N4 bias-field correction of MR volumes (A.3: "intensity non-uniformity correction", ref. [38]).

Wraps SimpleITK's ``N4BiasFieldCorrectionImageFilter``: the field is fitted on a shrunk image and mask, then
evaluated at full resolution with ``GetLogBiasFieldAsImage`` and the full-resolution image is divided by its
exponential. The shrink factor is reduced along coarse axes so the shrunk grid stays close to isotropic.

Spacing enters only through those shrink factors. ITK's B-spline lattice has a fixed number of control points
per axis stretched over the image's extent, so the fit itself does not depend on the spacing; but handing ITK
the physical spacing made it depend on float rounding: ``sitk.Shrink`` picks the input voxels by rounding
physical positions to indices (halfway between two voxels for an even factor), so (1.46, 1.46, 1.46) and
(1.460001, 1.46, 1.46) mm fitted different voxels and gave fields up to 16% apart (a DICOM series and its NIfTI copy, whose float32
spacings differ by ~1e-7 mm, gave different synthetic CTs). ITK therefore gets the voxel grid (unit spacing),
and the shrink factors are derived from the spacing snapped to ``spacing_tol`` (1e-4 mm), so spacings within
rounding of each other give the same field, bit for bit, and share one cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from mtl_med.data.nifti import check_array, source_name
from mtl_med.errors import InputError
from mtl_med.io import atomic_write

__all__ = ["SPACING_TOL", "otsu_mask", "snap_spacing", "shrink_factors", "n4_bias_field", "N4BiasFieldCorrection", "N4BiasFieldCorrectiond"]

logger = logging.getLogger(__name__)
_CACHE_VERSION = 2  # 2: fitted on the voxel grid, keyed by shrink factors (1: physical spacing)

# mm; spacings closer than this are one spacing for N4 (float32 NIfTI vs decimal DICOM differ by ~1e-7)
SPACING_TOL = 1e-4


def _to_sitk(array: np.ndarray) -> sitk.Image:
    # numpy (x, y, z) -> SimpleITK (z, y, x), on the voxel grid: unit spacing keeps sitk.Shrink's choice of
    # voxels (and every B-spline coordinate) free of the spacing's float rounding
    return sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))


def _from_sitk(img: sitk.Image) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def otsu_mask(array: np.ndarray, bins: int = 200, log: bool = True) -> np.ndarray:
    """Foreground mask (bool) by Otsu's threshold (SimpleITK), for 2D or 3D arrays.

    With ``log`` the threshold is found on ``log1p(max(x, 0))``: on a T2 image a plain Otsu threshold falls
    between dark muscle and bright fat / urine, while on the log scale it separates tissue from background.
    """
    arr = np.asarray(array, dtype=np.float32)
    shape = arr.shape
    while arr.ndim > 3 and arr.shape[0] == 1:  # channel-first (1, X, Y, Z)
        arr = arr[0]
    if log:
        arr = np.log1p(np.clip(arr, 0, None))
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    # insideValue=0 below the threshold, outsideValue=1 above it
    mask = sitk.OtsuThreshold(img, 0, 1, bins)
    return sitk.GetArrayFromImage(mask).T.astype(bool).reshape(shape)


def snap_spacing(spacing: Sequence[float], spacing_tol: float = SPACING_TOL) -> np.ndarray:
    """``spacing`` rounded to a multiple of ``spacing_tol`` mm (0: unchanged), so that spacings equal up to
    float rounding give identical numbers; an axis finer than the tolerance keeps its own value."""
    if not spacing_tol >= 0:
        raise ValueError(f"spacing_tol must be >= 0 mm, got {spacing_tol}")
    sp = np.asarray(spacing, float)
    if spacing_tol == 0:
        return sp
    steps = np.round(sp / spacing_tol)
    return np.where(steps > 0, steps * spacing_tol, sp)


def shrink_factors(spacing: Sequence[float], shrink_factor: int, spacing_tol: float = SPACING_TOL) -> list[int]:
    """Per-axis shrink factors: ``shrink_factor`` along the finest axis, less along coarser ones. The spacing is
    snapped to ``spacing_tol`` first: a ratio at a rounding edge (4 * 1.25 / 2.0 = 2.5) must not flip."""
    sp = snap_spacing(spacing, spacing_tol)
    return [max(1, int(round(shrink_factor * sp.min() / s))) for s in sp]


def n4_bias_field(
    array: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    mask: np.ndarray | None = None,
    *,
    shrink_factor: int = 4,
    num_iterations: Sequence[int] = (50, 50, 50),
    convergence_threshold: float = 1e-3,
    spline_order: int = 3,
    num_control_points: int | Sequence[int] = 4,
    bias_fwhm: float = 0.15,
    num_threads: int | None = None,
    spacing_tol: float = SPACING_TOL,
) -> np.ndarray:
    """Fit N4 and return the multiplicative bias field at full resolution (``corrected = array / field``).

    Args:
        array: 3D (x, y, z) intensities, positive inside the mask.
        spacing: voxel size in mm; it only sets the per-axis shrink factors (see :func:`shrink_factors`).
        mask: foreground (bool); None: Otsu threshold of ``array``. Non-positive voxels are always excluded.
        shrink_factor: fitting is done on an image shrunk by this factor (finest axis).
        num_iterations: iterations per fitting level (its length is the number of levels).
        convergence_threshold: N4 stops a level when the change falls below this.
        spline_order: B-spline order of the field.
        num_control_points: control points per axis at the first level (>= spline_order + 1).
        bias_fwhm: width of the Gaussian deconvolving the log histogram.
        num_threads: ITK threads (None: SimpleITK's default).
        spacing_tol: spacings equal to this many mm are one spacing (the same field, bit for bit); the
            default 1e-4 mm covers a NIfTI header's float32 rounding of a DICOM series' decimal spacing.
    """
    arr = np.asarray(array, dtype=np.float32)
    if mask is None:
        mask = otsu_mask(arr)
    mask = np.asarray(mask, bool) & (arr > 0)
    if not mask.any():
        raise ValueError("N4: the foreground mask is empty")
    img = _to_sitk(arr)
    msk = _to_sitk(mask.astype(np.uint8))
    factors = shrink_factors(spacing, shrink_factor, spacing_tol)
    small = sitk.Shrink(img, factors) if max(factors) > 1 else img
    small_mask = sitk.Shrink(msk, factors) if max(factors) > 1 else msk
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in num_iterations])
    n4.SetConvergenceThreshold(float(convergence_threshold))
    n4.SetSplineOrder(int(spline_order))
    cps = [int(num_control_points)] * 3 if np.isscalar(num_control_points) else [int(c) for c in num_control_points]
    n4.SetNumberOfControlPoints(cps)
    n4.SetBiasFieldFullWidthAtHalfMaximum(float(bias_fwhm))
    if num_threads is not None:
        n4.SetNumberOfThreads(int(num_threads))
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)  # evaluated on the full-resolution grid
    return np.exp(_from_sitk(log_field)).astype(np.float32)


def _spacing_of(img: Any) -> tuple[float, ...]:
    if isinstance(img, MetaTensor):
        return tuple(float(s) for s in img.pixdim[:3])
    return (1.0, 1.0, 1.0)


class N4BiasFieldCorrection(Transform):
    """N4 bias-field correction of a channel-first 3D image ``(C, X, Y, Z)`` (each channel separately).

    Spacing comes from the MetaTensor's affine. With ``cache_dir`` the fitted field is stored as
    ``<sha256>.npy``, keyed by the voxel content, the shrink factors (all the field takes from the spacing),
    mask and every parameter, so a training run fits each volume once and a DICOM series and its NIfTI copy
    share one entry.

    Args:
        shrink_factor, num_iterations, convergence_threshold, spline_order, num_control_points, bias_fwhm,
        num_threads, spacing_tol: see :func:`n4_bias_field`.
        cache_dir: folder for the field cache (None: no cache).
    """

    def __init__(
        self,
        shrink_factor: int = 4,
        num_iterations: Sequence[int] = (50, 50, 50),
        convergence_threshold: float = 1e-3,
        spline_order: int = 3,
        num_control_points: int | Sequence[int] = 4,
        bias_fwhm: float = 0.15,
        num_threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        spacing_tol: float = SPACING_TOL,
    ) -> None:
        snap_spacing((1.0,), spacing_tol)  # refuse a negative tolerance here, not at the first volume
        if int(shrink_factor) < 1:
            raise ValueError(f"shrink_factor must be >= 1, got {shrink_factor}")
        if len(num_iterations) < 1:
            raise ValueError("num_iterations needs at least one level")
        self.params = {
            "shrink_factor": int(shrink_factor),
            "num_iterations": [int(i) for i in num_iterations],
            "convergence_threshold": float(convergence_threshold),
            "spline_order": int(spline_order),
            "num_control_points": num_control_points if np.isscalar(num_control_points) else list(num_control_points),
            "bias_fwhm": float(bias_fwhm),
            "spacing_tol": float(spacing_tol),
        }
        self.num_threads = num_threads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.last_cache_hit: bool | None = None

    def cache_key(self, array: np.ndarray, spacing: Sequence[float], mask: np.ndarray | None) -> str:
        h = hashlib.sha256()
        # the shrink factors, not the spacing: they are all the field depends on (see the module docstring)
        factors = shrink_factors(spacing, self.params["shrink_factor"], self.params["spacing_tol"])
        h.update(json.dumps({"v": _CACHE_VERSION, "shape": list(array.shape), "shrink_factors": factors,
                             **self.params}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        if mask is not None:
            h.update(np.packbits(np.asarray(mask, bool)).tobytes())
        return h.hexdigest()

    def field(self, array: np.ndarray, spacing: Sequence[float], mask: np.ndarray | None = None) -> np.ndarray:
        """The bias field of one 3D array, from the cache when present."""
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self.cache_key(array, spacing, mask)}.npy"
            if path.is_file():
                try:
                    f = np.load(path)
                    if f.shape == array.shape:
                        self.last_cache_hit = True
                        return f
                except (OSError, ValueError):
                    logger.warning("N4 cache entry %s unreadable, recomputing", path)
        self.last_cache_hit = False
        f = n4_bias_field(array, spacing, mask, num_threads=self.num_threads, **self.params)
        if path is not None:
            with atomic_write(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, f)
        return f

    def __call__(self, img: Any, mask: Any = None, return_field: bool = False):
        name = source_name(img)
        check_array(img, name, role="mr", spatial_ndim=3 if np.ndim(img) == 3 else None)
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        squeeze = arr.ndim == 3
        if squeeze:
            arr = arr[None]
        if arr.ndim != 4:
            raise InputError(name, f"N4 needs a channel-first 3D image (C, X, Y, Z), got shape {tuple(arr.shape)}")
        m = None
        if mask is not None:
            m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            m = m.reshape(m.shape[-3:]) > 0
            if m.shape != arr.shape[1:]:
                raise InputError(name, f"N4 mask shape {m.shape} does not match the image {arr.shape[1:]}")
        spacing = _spacing_of(img)
        # ITK fits the B-spline on the shrunk grid, which needs >= 2 voxels per axis (else "zero-valued spacing")
        need = [2 * f for f in shrink_factors(spacing, self.params["shrink_factor"], self.params["spacing_tol"])]
        if any(n < k for n, k in zip(arr.shape[1:], need)):
            raise InputError(name, f"MR of shape {tuple(arr.shape[1:])} is too small for N4 bias-field correction "
                                   f"with shrink factor {self.params['shrink_factor']}: it needs at least "
                                   f"{tuple(need)} voxels")
        fields = np.empty(arr.shape, np.float32)
        for c in range(arr.shape[0]):
            try:
                fields[c] = self.field(arr[c].astype(np.float32), spacing, m)
            except (RuntimeError, ValueError) as err:
                raise InputError(name, f"N4 bias-field correction failed: {err}") from err
        out = (arr / fields).astype(np.float32)
        if squeeze:
            out, fields = out[0], fields[0]
        if isinstance(img, torch.Tensor):
            out_t = torch.as_tensor(out)
            out = MetaTensor(out_t, meta=img.meta, applied_operations=img.applied_operations) if isinstance(img, MetaTensor) else out_t
        return (out, fields) if return_field else out


class N4BiasFieldCorrectiond(MapTransform):
    """Dictionary wrapper of :class:`N4BiasFieldCorrection`.

    Args:
        keys: keys of the MR images to correct (usually "mr").
        mask_key: key of a foreground mask (e.g. "body"); None: Otsu threshold of each image.
        field_postfix: if given, the bias field is stored under ``f"{key}_{field_postfix}"``.
        allow_missing_keys: don't raise for missing keys.
        other arguments: see :class:`N4BiasFieldCorrection`.
    """

    def __init__(
        self,
        keys: KeysCollection = "mr",
        mask_key: str | None = None,
        shrink_factor: int = 4,
        num_iterations: Sequence[int] = (50, 50, 50),
        convergence_threshold: float = 1e-3,
        spline_order: int = 3,
        num_control_points: int | Sequence[int] = 4,
        bias_fwhm: float = 0.15,
        num_threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        field_postfix: str | None = None,
        allow_missing_keys: bool = False,
        spacing_tol: float = SPACING_TOL,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.n4 = N4BiasFieldCorrection(shrink_factor, num_iterations, convergence_threshold, spline_order,
                                        num_control_points, bias_fwhm, num_threads, cache_dir, spacing_tol)
        self.mask_key = mask_key
        self.field_postfix = field_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d[self.mask_key] if self.mask_key is not None else None
        for key in self.key_iterator(d):
            out, field = self.n4(d[key], mask=mask, return_field=True)
            d[key] = out
            if self.field_postfix:
                d[f"{key}_{self.field_postfix}"] = field
        return d
