"""Pipelines for the pelvis MR / CT / label data (A.3), built from MONAI transforms and datasets.

* :func:`preprocess_transforms` - deterministic: load with checks, N4 (MR), CT scaling, histogram
  standardisation (MR), resampling to 1.46 mm. Cached by :func:`make_dataset` (memory or disk).
* :func:`train_patch_transforms` - random: 128 x 128 patches from random axial slices (every slice can be
  drawn), random scaling +-10 % and rotation +-10 degrees applied identically to all keys (nearest neighbour
  for labels), zero padding to 136 x 136 and a "mask" key that is 1 exactly on voxels holding image data
  and 0 on padding, for losses computed only inside it. ``spatial_dims=3`` gives 3D patches with the same
  options.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    RandAffined,
    RandSpatialCropd,
    SpatialPadd,
    SqueezeDimd,
)

from mtl_med.transforms.histogram import HistogramStandardized
from mtl_med.transforms.intensity import ScaleCTd
from mtl_med.transforms.io import AddMaskd, CheckedCompose, CheckGeometryd, CheckVolumesd, LoadVolumesd
from mtl_med.transforms.n4 import N4BiasFieldCorrectiond
from mtl_med.transforms.spatial import CANONICAL_AXCODES, DEFAULT_PIXDIM, LABEL_KEYS, resample_transforms

__all__ = [
    "PATCH_SIZE_2D",
    "PADDED_SIZE_2D",
    "BATCH_SIZE",
    "preprocess_transforms",
    "context_size",
    "train_patch_transforms",
    "content_hash",
    "make_dataset",
]

PATCH_SIZE_2D = (128, 128)  # A.3: 128x128 patches from axial slices
PADDED_SIZE_2D = (136, 136)  # A.3: zero-padded to 136x136, loss only in the non-padded region
BATCH_SIZE = 10  # A.3
SCALE_RANGE = 0.1  # A.3: scaling in [-10 %, +10 %]
ROTATE_DEG = 10.0  # A.3: rotation in [-10, +10] degrees


def preprocess_transforms(
    keys: Sequence[str] = ("mr", "ct", "label"),
    *,
    landmarks: Any = None,
    n4: bool = True,
    n4_mask_key: str | None = None,
    n4_shrink_factor: int = 4,
    n4_iterations: Sequence[int] = (50, 50, 50),
    n4_convergence_threshold: float = 1e-3,
    n4_cache_dir: str | os.PathLike | None = None,
    n4_threads: int | None = None,
    foreground_method: str | None = "otsu",
    pixdim: float | Sequence[float] | None = DEFAULT_PIXDIM,
    min_overlap: float = 0.5,
    check: bool = True,
    axcodes: str | None = CANONICAL_AXCODES,
    truth_geometry: str | None = None,
    ct_clip: Sequence[float] | None = None,
    ct_scale: float | None = None,
    label_table: Mapping[int, Any] | None = None,
) -> Compose:
    """Deterministic preprocessing of a datalist item (file paths) into network-ready volumes.

    Order: load + checks -> every volume reoriented to ``axcodes`` (A.3 / NiftyNet: a standard orientation
    first; the training data's, recorded in the bundle) -> N4 on the MR's own grid (its spacing, A.3 ref. [38]) -> histogram standardisation
    with the training landmarks and zero mean / unit variance (A.3 ref. [40]) -> CT clipped to ``ct_clip`` and
    scaled to ``CT / ct_scale + 1`` (A.3: [-1024, 2500] HU, CT / 1024 + 1) ->
    MR, CT and labels resampled onto one ``pixdim`` grid aligned with the world axes (A.3: 1.46 mm; an oblique MR
    is straightened, so axis 2 is the true axial direction; None keeps the MR grid). CT is scaled before
    resampling, so fill outside its field of view is air. Every spatial step is invertible (MONAI ``Invertd``):
    outputs go back onto the input's own grid and orientation.

    Args:
        keys: item keys to load; absent ones (e.g. "ct" / "label" at inference) are skipped.
        landmarks: landmarks file from ``python -m data_prep.landmarks`` (None: no histogram standardisation).
        n4: run N4 on "mr"; the other ``n4_*`` arguments go to :class:`N4BiasFieldCorrectiond`.
        foreground_method: foreground of the histogram standardisation, as the landmarks were learned.
        pixdim: target spacing.
        min_overlap: MR / CT / label must overlap at least this fraction in physical space.
        check: run the bad-input checks.
        axcodes: canonical orientation (nibabel axis codes; "RAS": axis 2 inferior -> superior); None keeps the
            stored axes (then slicing follows the storage, not the anatomy).
        truth_geometry: None (training: CT and labels are resampled onto the MR grid, A.3), "raise" (evaluation:
            a CT / label not on its MR's grid is an input error) or "resample" (resampled, with a warning).
        ct_clip, ct_scale: the CT's HU range and network scale (:class:`ScaleCTd`), required with a "ct" key (the
            pelvis bundle passes ``mtl_med.pelvis.CT_RANGE_HU`` and ``mtl_med.pelvis.CT_SCALE``).
        label_table: label value -> name, the values a "label" volume may hold; required with a "label" key when
            ``check`` is set (the pelvis bundle passes ``mtl_med.pelvis.LABEL_TABLE``).
    """
    keys = list(keys)
    if "ct" in keys and (ct_clip is None or ct_scale is None):
        raise ValueError("preprocess_transforms with a 'ct' key needs ct_clip and ct_scale (the CT's HU range and "
                         "network scale, e.g. mtl_med.pelvis.CT_RANGE_HU and mtl_med.pelvis.CT_SCALE)")
    if check and "label" in keys and label_table is None:
        raise ValueError("preprocess_transforms with a 'label' key needs label_table (label value -> name, e.g. "
                         "mtl_med.pelvis.LABEL_TABLE) to check the label values")
    xforms: list[Callable] = [LoadVolumesd(keys, check=check, allow_missing_keys=True, label_table=label_table)]
    if check:
        xforms.append(CheckVolumesd(keys, min_overlap=min_overlap, allow_missing_keys=True, label_table=label_table))
    if truth_geometry is not None:
        xforms.append(CheckGeometryd([k for k in keys if k != "mr"], on_mismatch=truth_geometry))
    if axcodes is not None:
        # labels given explicitly: our affines are nibabel's RAS+ world (MONAI would otherwise warn and guess)
        xforms.append(Orientationd(keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")),
                                   allow_missing_keys=True))
    if n4 and "mr" in keys:
        xforms.append(N4BiasFieldCorrectiond("mr", mask_key=n4_mask_key, shrink_factor=n4_shrink_factor,
                                             num_iterations=n4_iterations,
                                             convergence_threshold=n4_convergence_threshold,
                                             num_threads=n4_threads, cache_dir=n4_cache_dir))
    if landmarks is not None and "mr" in keys:
        xforms.append(HistogramStandardized("mr", landmarks=landmarks, foreground_method=foreground_method))
    if "ct" in keys:
        xforms.append(ScaleCTd("ct", clip=tuple(ct_clip), scale=ct_scale, allow_missing_keys=True))
    xforms.append(resample_transforms(keys, ref_key="mr", pixdim=pixdim, diagonal=axcodes is not None))
    xforms.append(EnsureTyped(keys, dtype=np.float32, allow_missing_keys=True))
    return CheckedCompose(xforms)


def context_size(patch_size: Sequence[int], scale_range: float, rotate_deg: float) -> tuple[int, ...]:
    """Size of the crop that holds every voxel a patch can sample after scaling up to ``1 + scale_range``
    and rotating up to ``rotate_deg`` (about each axis in 3D), plus one voxel of margin."""
    p = np.asarray(patch_size, float)
    nd = len(p)
    th = math.radians(min(abs(rotate_deg) * (nd - 1), 90.0))  # 3D: rotations about two other axes add up
    out = []
    for i in range(nd):
        others = p.sum() - p[i]
        ext = (1 + abs(scale_range)) * (p[i] * math.cos(th) + others * math.sin(th)) if th > 0 else (1 + abs(scale_range)) * p[i]
        out.append(int(math.ceil(max(ext, p[i]))) + 2)
    return tuple(out)


def train_patch_transforms(
    keys: Sequence[str] = ("mr", "ct", "label"),
    *,
    spatial_dims: int = 2,
    patch_size: Sequence[int] | None = None,
    padded_size: Sequence[int] | None = None,
    scale_range: float = SCALE_RANGE,
    rotate_deg: float = ROTATE_DEG,
    prob: float = 1.0,
    label_keys: Sequence[str] = LABEL_KEYS,
    mask_key: str = "mask",
    ref_key: str = "mr",
    seed: int | None = 0,
) -> Compose:
    """Random patch sampling and augmentation on preprocessed channel-first volumes (C, X, Y, Z), axial
    slices along the last axis.

    Args:
        keys: image / label keys cropped together; absent keys are skipped.
        spatial_dims: 2 - 2D patches from one axial slice each, output (C, *padded_size); 3 - 3D patches.
        patch_size: patch size (2D default 128 x 128, A.3; 3D default 128 x 128 x 32).
        padded_size: size after zero padding (default: patch + 8, i.e. 136 x 136 in 2D, A.3).
        scale_range: random scaling factor in [1 - s, 1 + s] (A.3: 0.1).
        rotate_deg: random rotation in [-r, r] degrees, in-plane in 2D, about every axis in 3D (A.3: 10).
        prob: probability of applying the augmentation.
        label_keys: keys interpolated with nearest neighbour.
        mask_key: output key of the mask of voxels holding image data (1) versus padding (0).
        ref_key: key whose grid defines the mask.
        seed: random state of the returned Compose (None: leave MONAI's default).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if patch_size is None:
        patch_size = PATCH_SIZE_2D if spatial_dims == 2 else (128, 128, 32)
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != spatial_dims or min(patch_size) < 1:
        raise ValueError(f"patch_size must have {spatial_dims} positive sizes, got {patch_size}")
    padded_size = tuple(int(p) for p in padded_size) if padded_size is not None else tuple(p + 8 for p in patch_size)
    if len(padded_size) != spatial_dims or any(q < p for p, q in zip(patch_size, padded_size)):
        raise ValueError(f"padded_size {padded_size} must be >= patch_size {patch_size}")
    if not 0 <= scale_range < 1 or rotate_deg < 0:
        raise ValueError("scale_range must be in [0, 1) and rotate_deg >= 0")
    all_keys = list(keys) + [mask_key]
    mode = ["nearest" if k in label_keys or k == mask_key else "bilinear" for k in all_keys]
    ctx = context_size(patch_size, scale_range, rotate_deg)
    rot = math.radians(rotate_deg)
    if spatial_dims == 2:
        # one axial slice, uniformly over all slices (A.3: n = 62 of 62), with room for the rotation
        crop = RandSpatialCropd(all_keys, roi_size=(*ctx, 1), random_size=False, allow_missing_keys=True)
        to_nd = [SqueezeDimd(all_keys, dim=3, allow_missing_keys=True)]
        rotate_range = (rot,)
    else:
        crop = RandSpatialCropd(all_keys, roi_size=ctx, random_size=False, allow_missing_keys=True)
        to_nd = []
        rotate_range = (rot, rot, rot)
    xforms = [
        AddMaskd(ref_key=ref_key, mask_key=mask_key),
        crop,
        *to_nd,
        RandAffined(all_keys, spatial_size=patch_size, prob=prob, rotate_range=rotate_range,
                    scale_range=(scale_range,) * spatial_dims, mode=mode, padding_mode="zeros",
                    allow_missing_keys=True),
        # zero padding; the mask is 0 there (A.3: loss only in non-padded regions)
        SpatialPadd(all_keys, spatial_size=padded_size, mode="constant", allow_missing_keys=True),
        EnsureTyped(all_keys, dtype=np.float32, track_meta=False, allow_missing_keys=True),
    ]
    comp = Compose(xforms)
    if seed is not None:
        comp.set_random_state(seed=seed)
    return comp


def content_hash(extra: str = "") -> Callable[[Mapping[str, Any]], bytes]:
    """A PersistentDataset ``hash_func`` keyed by the content of the item's files plus ``extra`` (e.g. the
    preprocessing parameters), so edited files or changed parameters never reuse a stale cache entry."""

    def _hash(item: Mapping[str, Any]) -> bytes:
        h = hashlib.sha256(extra.encode())
        for k in sorted(item):
            v = item[k]
            h.update(str(k).encode())
            if isinstance(v, (str, os.PathLike)) and Path(v).is_file():
                with open(v, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(repr(v).encode())
        return h.hexdigest().encode()

    return _hash


def _describe(obj: Any, depth: int = 4) -> str:
    """A deterministic text of a transform's parameters for cache keys: plain values, arrays (by
    content) and nested objects' attributes; anything else (random states, callables) by type name.
    (MONAI's ``PersistentDataset(hash_transform=json_hashing)`` falls back to class names for
    transforms that are not JSON-serialisable, which ours are not.)"""
    if isinstance(obj, (str, int, float, bool, type(None), Path)):
        return repr(obj)
    if isinstance(obj, type):
        return obj.__name__
    if isinstance(obj, np.ndarray) or torch.is_tensor(obj):
        a = np.ascontiguousarray(obj.detach().cpu().numpy() if torch.is_tensor(obj) else obj)
        return f"array{a.shape}:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_describe(v, depth) for v in obj) + "]"
    if isinstance(obj, Mapping):
        return "{" + ",".join(f"{k}:{_describe(obj[k], depth)}" for k in sorted(obj, key=str)) + "}"
    if depth > 0 and hasattr(obj, "__dict__") and not callable(getattr(obj, "__func__", None)):
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "R"}
        return type(obj).__name__ + _describe(attrs, depth - 1)
    return type(obj).__name__


def make_dataset(
    items: Sequence[Mapping[str, Any]],
    preprocess: Compose,
    patches: Compose | None = None,
    *,
    cache: str | None = "memory",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Dataset:
    """Dataset of ``preprocess`` (cached) followed by ``patches`` (random, every draw).

    Args:
        cache: "memory" (``CacheDataset``), "disk" (``PersistentDataset`` in ``cache_dir``, keyed by
            :func:`content_hash` of the files and the preprocessing), or None.
    """
    # flat: a nested Compose counts as random for MONAI's caches, which would stop caching before it
    transform = Compose([*preprocess.transforms, *(patches.transforms if patches is not None else [])]).flatten()
    if patches is not None:
        transform.set_random_state(state=patches.R)
    data = [dict(x) for x in items]
    if cache == "memory":
        # hash_as_key: an item repeated (train.json lists each volume samples_per_volume times) is preprocessed
        # and held once, not once per repeat; every draw of it still gets its own random patch
        return CacheDataset(data, transform, num_workers=num_workers or None, progress=False, hash_as_key=True)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError('cache="disk" needs cache_dir')
        # track_meta: the cached volumes keep their affines (the resampling needs them); the cache
        # files are this function's own, so they are loaded as full pickles (weights_only=False)
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_func=content_hash(_describe(preprocess.transforms)),
                                 track_meta=True, weights_only=False)
    if cache is None:
        return Dataset(data, transform)
    raise ValueError(f'cache must be "memory", "disk" or None, got {cache!r}')
