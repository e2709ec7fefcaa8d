"""Histogram standardisation of MR intensities (Nyul & Udupa; the SFG paper's ref. [40], A.3).

Training: for each training image, the intensities at ``quantiles`` (1st percentile, deciles, 99th
percentile) are mapped linearly so that the 1st -> ``standard_range[0]`` and 99th -> ``standard_range[1]``;
the landmarks are the average of these over the training set and are saved to a JSON file. Application: the
image's own quantiles are mapped piecewise-linearly onto the landmarks (linear extrapolation beyond the 1st
and 99th percentiles), then the image is normalised to zero mean and unit variance (A.3).

MONAI's ``HistogramNormalize`` equalises each image on its own and is not this method. TorchIO's
``HistogramStandardization`` implements the same mapping; with the same quantiles and mask the two agree
(see tests/transforms/test_histogram.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from mtl_med.data.nifti import check_array, source_name
from mtl_med.errors import InputError
from mtl_med.io import atomic_write_json, verify_shipped
from mtl_med.transforms.n4 import otsu_mask

__all__ = [
    "DEFAULT_QUANTILES",
    "foreground",
    "image_percentiles",
    "learn_landmarks",
    "save_landmarks",
    "load_landmarks",
    "apply_landmarks",
    "HistogramStandardize",
    "HistogramStandardized",
]

# A.3: cut-offs at the 1st and 99th percentiles, deciles in between (Nyul & Udupa's "deciles" variant)
DEFAULT_QUANTILES: tuple[float, ...] = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
STANDARD_RANGE = (0.0, 100.0)
_FORMAT = "mtl_med.histogram_landmarks"


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def foreground(array: np.ndarray, method: str | None = "otsu", mask: Any = None) -> np.ndarray:
    """Voxels used for the statistics: ``mask`` if given, else "otsu" (log-Otsu threshold), "nonzero",
    "mean" (above the image mean, Nyul's original choice) or None / "all"."""
    arr = np.asarray(array)
    if mask is not None:
        m = _np(mask).reshape(arr.shape) > 0
    elif method in (None, "all"):
        m = np.ones(arr.shape, bool)
    elif method == "otsu":
        m = otsu_mask(arr)
    elif method == "nonzero":
        m = arr != 0
    elif method == "mean":
        m = arr > arr.mean()
    else:
        raise ValueError(f"unknown foreground method {method!r}; use 'otsu', 'nonzero', 'mean', 'all' or None")
    return m


def image_percentiles(array: np.ndarray, mask: np.ndarray, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> np.ndarray:
    vals = np.asarray(array, dtype=np.float64)[mask]
    if vals.size == 0:
        raise ValueError("the foreground mask is empty")
    return np.percentile(vals, 100 * np.asarray(quantiles, float))


def learn_landmarks(
    images: Iterable[Any],
    masks: Iterable[Any] | None = None,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    standard_range: Sequence[float] = STANDARD_RANGE,
    foreground_method: str | None = "otsu",
) -> np.ndarray:
    """Average standardised landmarks over training images (arrays or tensors, any shape).

    Returns a strictly increasing array, one value per quantile, from ``standard_range[0]`` to
    ``standard_range[1]``.
    """
    q = np.asarray(quantiles, float)
    if q.ndim != 1 or len(q) < 2 or np.any(np.diff(q) <= 0) or q[0] < 0 or q[-1] > 1:
        raise ValueError(f"quantiles must increase strictly within [0, 1], got {list(quantiles)}")
    s1, s2 = float(standard_range[0]), float(standard_range[1])
    if not s2 > s1:
        raise ValueError(f"standard_range must increase, got {standard_range}")
    masks_it = iter(masks) if masks is not None else None
    rows = []
    for idx, img in enumerate(images):
        arr = _np(img)
        name = source_name(img, f"<training image {idx}>")
        check_array(arr, name, role="mr", spatial_ndim=None)
        m = foreground(arr, foreground_method, next(masks_it) if masks_it is not None else None)
        p = image_percentiles(arr, m, q)
        if p[-1] - p[0] <= 0:
            raise InputError(name, "1st and 99th percentiles are equal inside the foreground; cannot standardise")
        rows.append(s1 + (p - p[0]) / (p[-1] - p[0]) * (s2 - s1))
    if not rows:
        raise ValueError("learn_landmarks needs at least one image")
    landmarks = np.mean(rows, axis=0)
    return landmarks


def save_landmarks(
    path: str | os.PathLike,
    landmarks: Sequence[float],
    *,
    modality: str = "mr",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    foreground_method: str | None = "otsu",
    num_images: int | None = None,
    source: str | None = None,
) -> Path:
    """Write landmarks (and what they were learned with) to a JSON file, atomically."""
    lm = [float(v) for v in landmarks]
    if len(lm) != len(quantiles):
        raise ValueError(f"{len(lm)} landmarks for {len(quantiles)} quantiles")
    obj = {
        "format": _FORMAT,
        "version": 1,
        "modality": modality,
        "quantiles": [float(v) for v in quantiles],
        "landmarks": lm,
        "foreground": foreground_method,
        "num_images": num_images,
        "source": source,
    }
    return atomic_write_json(obj, path)


def load_landmarks(path: str | os.PathLike, *, modality: str | None = "mr") -> dict:
    """Read a landmarks file; checks format, monotonic landmarks and (when given) the modality.

    Raises:
        InputError: naming the file, when it is missing, unreadable, malformed or for another modality.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "landmarks file does not exist")
    verify_shipped(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read landmarks JSON ({err})") from err
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise InputError(path, f"not a histogram landmarks file (expected format {_FORMAT!r})")
    if modality is not None and obj.get("modality") != modality:
        raise InputError(path, f"landmarks were learned for modality {obj.get('modality')!r}, not {modality!r}")
    lm = np.asarray(obj.get("landmarks", []), float)
    q = np.asarray(obj.get("quantiles", []), float)
    if lm.ndim != 1 or len(lm) < 2 or len(lm) != len(q):
        raise InputError(path, f"{len(lm)} landmarks for {len(q)} quantiles")
    if not np.all(np.isfinite(lm)) or np.any(np.diff(lm) <= 0):
        raise InputError(path, "landmarks are not finite and strictly increasing")
    obj["landmarks"], obj["quantiles"] = lm, q
    return obj


def apply_landmarks(
    array: np.ndarray,
    landmarks: Sequence[float],
    mask: np.ndarray,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    epsilon: float = 1e-5,
) -> np.ndarray:
    """Map ``array`` piecewise-linearly so that its quantiles (inside ``mask``) land on ``landmarks``.

    Beyond the first / last quantile the end segments are extended. Segments whose input quantiles coincide
    (difference < ``epsilon``) get slope 0, so the mapping is always monotonic non-decreasing.
    """
    lm = np.asarray(landmarks, float)
    p = image_percentiles(array, mask, quantiles)
    dp = np.diff(p)
    slopes = np.where(dp < epsilon, 0.0, np.diff(lm) / np.where(dp < epsilon, 1.0, dp))
    intercepts = lm[:-1] - slopes * p[:-1]
    data = np.asarray(array, dtype=np.float64)
    seg = np.digitize(data, p[1:-1], right=False)  # 0 .. len(p) - 2
    return (slopes[seg] * data + intercepts[seg]).astype(np.float32)


class HistogramStandardize(Transform):
    """Histogram standardisation of a channel-first image, then zero mean / unit variance (A.3).

    Args:
        landmarks: a landmarks file written by :func:`save_landmarks` / ``python -m data_prep.landmarks``, a dict
            from :func:`load_landmarks`, or an array of landmarks (with ``quantiles``).
        modality: the landmarks file must have been learned for this modality.
        foreground_method: voxels whose quantiles are matched and whose mean / std normalise the result
            ("otsu", "nonzero", "mean", "all"/None); it must match the one used for learning.
        normalize: subtract the foreground mean and divide by its standard deviation afterwards.
        quantiles: the quantiles when ``landmarks`` is a plain array.
    """

    def __init__(
        self,
        landmarks: str | os.PathLike | Mapping | Sequence[float] | np.ndarray,
        modality: str = "mr",
        foreground_method: str | None = "otsu",
        normalize: bool = True,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
    ) -> None:
        if isinstance(landmarks, (str, os.PathLike)):
            info = load_landmarks(landmarks, modality=modality)
        elif isinstance(landmarks, Mapping):
            info = dict(landmarks)
            if modality is not None and info.get("modality", modality) != modality:
                raise InputError("<landmarks dict>", f"landmarks are for {info.get('modality')!r}, not {modality!r}")
        else:
            info = {"landmarks": np.asarray(landmarks, float), "quantiles": np.asarray(quantiles, float)}
        self.landmarks = np.asarray(info["landmarks"], float)
        self.quantiles = np.asarray(info["quantiles"], float)
        if len(self.landmarks) != len(self.quantiles) or np.any(np.diff(self.landmarks) <= 0):
            raise ValueError("landmarks must be strictly increasing, one per quantile")
        saved_fg = info.get("foreground", foreground_method)
        if "foreground" in info and saved_fg != foreground_method:
            raise ValueError(f"landmarks were learned with foreground {saved_fg!r}, transform uses {foreground_method!r}")
        self.foreground_method = foreground_method
        self.normalize = normalize

    def __call__(self, img: Any, mask: Any = None) -> Any:
        name = source_name(img)
        arr = _np(img)
        check_array(arr, name, role="mr", spatial_ndim=None)
        out = np.empty(arr.shape, np.float32)
        # a 3D array is one channel; otherwise channel-first (C, spatial...)
        channels = arr[None] if arr.ndim == 3 else arr
        res = out[None] if arr.ndim == 3 else out
        for c in range(channels.shape[0]):
            m = foreground(channels[c], self.foreground_method, mask)
            if not m.any():
                raise InputError(name, "empty foreground: cannot standardise the histogram")
            mapped = apply_landmarks(channels[c], self.landmarks, m, self.quantiles)
            if self.normalize:
                mu, sd = mapped[m].mean(), mapped[m].std()
                mapped = (mapped - mu) / (sd if sd > 0 else 1.0)
            res[c] = mapped
        if isinstance(img, MetaTensor):
            return MetaTensor(torch.as_tensor(out), meta=img.meta, applied_operations=img.applied_operations)
        return torch.as_tensor(out) if isinstance(img, torch.Tensor) else out


class HistogramStandardized(MapTransform):
    """Dictionary wrapper of :class:`HistogramStandardize`.

    Args:
        keys: MR keys to standardise (usually "mr").
        landmarks: landmarks file (or dict / array), see :class:`HistogramStandardize`.
        mask_key: key of a foreground mask to use instead of ``foreground_method``.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "mr",
        landmarks: Any = None,
        modality: str = "mr",
        foreground_method: str | None = "otsu",
        normalize: bool = True,
        mask_key: str | None = None,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if landmarks is None:
            raise ValueError("HistogramStandardized needs landmarks (a file from python -m data_prep.landmarks)")
        self.t = HistogramStandardize(landmarks, modality, foreground_method, normalize, quantiles)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d[self.mask_key] if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.t(d[key], mask=mask)
        return d
