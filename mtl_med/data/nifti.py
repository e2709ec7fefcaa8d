"""Checks on NIfTI inputs and datalists, shared by the data tools, the transforms and inference.

The "mr" and "ct" entries of a datalist may also name a DICOM series folder (:data:`DICOM_ROLES`), checked by
:func:`mtl_med.dicom.read_headers` and read by MONAI's ITK reader.

Every check raises :class:`~mtl_med.errors.InputError` whose message names the file and the problem, before
anything is written. The roles, the label table and the datalist image keys are the pelvis application's
(:mod:`mtl_med.pelvis`).

Typical use::

    img = check_volume("case/mr.nii.gz", role="mr")        # nibabel image, data verified
    check_case({"mr": ..., "ct": ..., "label": ...})        # each volume + physical overlap
    datalist = check_datalist("datalist.json")              # absolute paths, all files present
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mtl_med.errors import InputError  # noqa: F401  (also importable from here: the checks raise it)
from mtl_med.pelvis import BINARY_ROLES, IMAGE_KEYS, LABEL_TABLE, SIGNAL_ROLES

__all__ = [
    "InputError",
    "check_volume",
    "check_array",
    "check_overlap",
    "check_case",
    "check_datalist",
    "source_name",
    "world_bounds",
    "DICOM_ROLES",
]

# datalist keys that may name a DICOM series folder instead of a NIfTI file, and the series' modality
DICOM_ROLES = {"mr": "MR", "ct": "CT"}


def _series_geometry(path: Any, role: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS+ affine of a DICOM series folder, its voxels read and checked like a NIfTI volume's."""
    from mtl_med.dicom import load_series, read_headers

    hdr = read_headers(path, role=role, modality=DICOM_ROLES[role])
    img = load_series(path, role=role, headers=hdr)
    check_array(img, path, role=role, spatial_ndim=3)
    return tuple(img.shape[1:]), np.asarray(img.affine, float)


def source_name(obj: Any, default: str = "<in-memory volume>") -> str:
    """The file an array came from: ``meta['filename_or_obj']`` of a MetaTensor, else ``default``."""
    meta = getattr(obj, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if name:
            return str(name)
    return default


def check_array(array: Any, path: Any = "<in-memory volume>", *, role: str = "mr", spatial_ndim: int | None = 3) -> None:
    """Check voxel values of an already-loaded volume (numpy array or tensor).

    Args:
        array: the voxels; a leading channel axis of size 1 is allowed when ``spatial_ndim`` is given.
        path: the name used in error messages.
        role: "mr", "ct", "label" or a mask role ("bone", "body", "mask"); decides the value checks.
        spatial_ndim: required number of spatial axes (None: any).

    Raises:
        InputError: empty, wrong dimensionality, NaN / inf voxels, constant MR / CT, label values outside
            :data:`mtl_med.pelvis.LABEL_TABLE`, non-binary masks.
    """
    arr = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    if arr.size == 0:
        raise InputError(path, f"empty volume (shape {tuple(arr.shape)})")
    if spatial_ndim is not None:
        shape = arr.shape
        if arr.ndim == spatial_ndim + 1 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != spatial_ndim:
            raise InputError(path, f"expected a {spatial_ndim}D volume, got shape {tuple(arr.shape)} ({len(shape)}D)")
        if min(shape) < 1:
            raise InputError(path, f"empty volume (shape {tuple(arr.shape)})")
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise InputError(path, f"{n_nan} NaN and {n_inf} inf voxels")
    if role in SIGNAL_ROLES:
        if float(arr.max()) == float(arr.min()):
            raise InputError(path, f"empty {role} volume: every voxel is {float(arr.min())}")
    elif role == "label":
        values = np.unique(arr)
        bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in LABEL_TABLE)]
        if bad:
            raise InputError(
                path, f"label values {bad[:10]} outside the label table {sorted(LABEL_TABLE)} ({LABEL_TABLE})"
            )
    elif role in BINARY_ROLES:
        values = np.unique(arr)
        if not set(values.tolist()) <= {0, 1}:
            raise InputError(path, f"{role} mask must be binary (0/1), found values {values[:10].tolist()}")


def check_volume(path: str | os.PathLike, *, role: str = "mr") -> nib.Nifti1Image:
    """Load a NIfTI volume and check it; returns the nibabel image (data already read and verified).

    Raises:
        InputError: missing, unreadable or truncated file; not 3D; empty; NaN / inf; see :func:`check_array`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{role} file does not exist")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for a bad header
        raise InputError(path, f"cannot read as NIfTI ({type(err).__name__}: {err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    if len(img.shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(img.shape)} ({len(img.shape)}D)")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip stream / short file
        raise InputError(path, f"truncated or corrupt voxel data ({type(err).__name__}: {err})") from err
    check_array(data, path, role=role, spatial_ndim=3)
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "invalid affine (singular or non-finite voxel-to-world matrix)")
    # keep the voxels that were read so callers do not read the file twice
    return nib.Nifti1Image(data, affine, img.header) if isinstance(img, nib.Nifti1Image) else img


def world_bounds(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of a grid, voxel edges included."""
    shape = np.asarray(shape[:3], dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def check_overlap(volumes: Mapping[str, tuple[Any, Sequence[int], np.ndarray]], *, min_overlap: float = 0.5) -> None:
    """Check that volumes occupy the same physical space.

    Args:
        volumes: role -> (file name, shape, affine).
        min_overlap: the intersection of each pair's bounding boxes must cover at least this fraction of the
            smaller box.

    Raises:
        InputError: naming both files, when a pair overlaps less than ``min_overlap``.
    """
    items = list(volumes.items())
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (ra, (pa, sa, aa)), (rb, (pb, sb, ab)) = items[i], items[j]
            lo_a, hi_a = world_bounds(sa, aa)
            lo_b, hi_b = world_bounds(sb, ab)
            inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
            smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
            frac = float(inter / smaller) if smaller > 0 else 0.0
            if frac < min_overlap:
                raise InputError(
                    pb,
                    f"{rb} does not overlap {ra} {pa} in physical space (overlap {frac:.1%} of the smaller volume, "
                    f"need {min_overlap:.0%}; {rb} spans {np.round(lo_b, 1).tolist()}..{np.round(hi_b, 1).tolist()} mm, "
                    f"{ra} spans {np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()} mm)",
                )


def check_case(item: Mapping[str, Any], *, min_overlap: float = 0.5, keys: Sequence[str] = IMAGE_KEYS) -> None:
    """Check every volume of a datalist item (``{"mr": path, "ct": path, "label": path, ...}``) and that they
    overlap in physical space. Paths must already be resolved (see :func:`check_datalist`).

    Raises:
        InputError: for the first bad file.
    """
    if "mr" not in item:
        raise InputError(item.get("ct", "<datalist item>"), f'datalist item has no "mr" entry: {dict(item)}')
    geoms = {}
    for key in keys:
        if key in item and item[key] is not None:
            if key in DICOM_ROLES and Path(item[key]).is_dir():
                geoms[key] = (item[key], *_series_geometry(item[key], key))
                continue
            img = check_volume(item[key], role=key)
            geoms[key] = (item[key], img.shape, img.affine)
    check_overlap(geoms, min_overlap=min_overlap)


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        p = Path(value)
        return str(p if p.is_absolute() else (base / p))
    return value


def check_datalist(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    sections: Sequence[str] = ("training", "validation", "test"),
    require_targets: bool = False,
    check_volumes: bool = False,
    min_overlap: float = 0.5,
) -> dict[str, list[dict]]:
    """Read a datalist (file or dict) and check that every file it names exists.

    Paths relative to the datalist's folder (or ``base_dir``) are resolved as MONAI's
    ``load_decathlon_datalist`` does. Returns ``{section: [item, ...]}`` with absolute paths for the sections
    present.

    Args:
        require_targets: training / validation items must have "ct" or "label".
        check_volumes: also run :func:`check_case` on every item (reads every volume).

    Raises:
        InputError: unreadable JSON, no known section, an item without "mr", a missing file.
    """
    from monai.data import load_decathlon_datalist

    if isinstance(path_or_dict, Mapping):
        name = "<datalist dict>"
        data = dict(path_or_dict)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        loaded = {}
        for sec in sections:
            if sec in data:
                items = data[sec]
                if not isinstance(items, list) or not all(isinstance(x, Mapping) for x in items):
                    raise InputError(name, f'section "{sec}" must be a list of dicts')
                loaded[sec] = [{k: _resolve(base, v) if k in IMAGE_KEYS else v for k, v in x.items()} for x in items]
    else:
        name = str(path_or_dict)
        path = Path(path_or_dict)
        if not path.is_file():
            raise InputError(path, "datalist file does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(path, f"cannot read datalist JSON ({err})") from err
        if not isinstance(data, Mapping):
            raise InputError(path, "datalist JSON must be an object with training / validation / test lists")
        # absolute, so MONAI's resolution and ours agree for a datalist named by a relative path
        base = (Path(base_dir) if base_dir is not None else path.parent).resolve()
        loaded = {}
        for sec in sections:
            if sec in data:
                if not isinstance(data[sec], list) or not all(isinstance(x, Mapping) for x in data[sec]):
                    raise InputError(path, f'section "{sec}" must be a list of dicts')
                items = (load_decathlon_datalist(path, is_segmentation=True, data_list_key=sec, base_dir=base)
                         if data[sec] else [])
                # MONAI leaves a relative path as it is when the file is missing: resolve it for the message
                loaded[sec] = [{k: _resolve(base, v) if k in IMAGE_KEYS else v for k, v in x.items()} for x in items]
    if not loaded:
        raise InputError(name, f"datalist has none of the sections {list(sections)}")
    for sec, items in loaded.items():
        for idx, item in enumerate(items):
            if "mr" not in item:
                raise InputError(name, f'{sec}[{idx}] has no "mr" entry')
            if require_targets and sec in ("training", "validation") and not ("ct" in item or "label" in item):
                raise InputError(name, f'{sec}[{idx}] has neither "ct" nor "label"')
            for key in IMAGE_KEYS:
                if key in item and item[key] is not None and not Path(item[key]).is_file():
                    if key in DICOM_ROLES and Path(item[key]).is_dir():
                        from mtl_med.dicom import is_series_folder

                        if not is_series_folder(item[key]):
                            raise InputError(item[key], f'folder listed as "{key}" in {sec}[{idx}] of {name} holds '
                                                        "no DICOM files (a DICOM series folder was expected)")
                        continue
                    raise InputError(item[key], f'file listed as "{key}" in {sec}[{idx}] of {name} does not exist')
            if check_volumes:
                check_case(item, min_overlap=min_overlap)
    return loaded
