"""Checks on NIfTI inputs and datalists, shared by the data tools, the transforms and inference.

The "mr" and "ct" entries of a datalist may also name a DICOM series folder (:data:`DICOM_ROLES`), checked by
:func:`mtl_med.data.dicom.read_headers` and read by MONAI's ITK reader.

Every check raises :class:`~mtl_med.errors.InputError` whose message names the file and the problem, before
anything is written. A datalist item names its image files under :data:`IMAGE_KEYS`; a role decides the value
checks (:data:`SIGNAL_ROLES`, "label", :data:`BINARY_ROLES`). The label values a label volume may hold are the
application's: ``label_table`` (label value -> name) is an argument of every check that may see a "label".

Size limits: a volume is read only after its header is checked (:func:`check_claimed_size`), so a tiny file
whose header claims a huge grid (a gzip "bomb", a corrupt header) is refused in one line instead of driving
the process out of memory. A header may claim at most :data:`MAX_VOXELS` voxels (2^30: a 1024^3 grid, far
above any pelvic scan; override with the environment variable ``MTL_MED_MAX_VOXELS`` or the ``max_voxels``
argument) and no more bytes than the memory available.

Typical use::

    img = check_volume("case/mr.nii.gz", role="mr")        # nibabel image, data verified
    check_case({"mr": ..., "ct": ..., "label": ...})        # each volume + physical overlap
    datalist = check_datalist("datalist.json")              # absolute paths, all files present
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mtl_med.errors import ConfigError, InputError  # noqa: F401  (InputError also importable from here)

__all__ = [
    "InputError",
    "check_volume",
    "read_header",
    "check_claimed_size",
    "check_series_size",
    "voxel_limit",
    "available_memory",
    "MAX_VOXELS",
    "MAX_VOXELS_ENV",
    "check_array",
    "check_overlap",
    "check_case",
    "check_datalist",
    "source_name",
    "world_bounds",
    "DICOM_ROLES",
    "IMAGE_KEYS",
    "SIGNAL_ROLES",
    "BINARY_ROLES",
]

# the datalist convention: keys of an item that name image files (others, such as "fold", are passed through)
IMAGE_KEYS = ("mr", "ct", "label", "bone", "body", "mask", "bias", "tissue")
# roles whose volumes must not be constant (a constant MR or CT carries no image)
SIGNAL_ROLES = ("mr", "ct")
# roles whose volumes are binary masks
BINARY_ROLES = ("bone", "body", "mask")

# datalist keys that may name a DICOM series folder instead of a NIfTI file, and the series' modality
DICOM_ROLES = {"mr": "MR", "ct": "CT"}

# voxels a header may claim: 2^30 (a 1024^3 grid, 2 GB of int16) is far above any real scan, far below a bomb
MAX_VOXELS = 2**30
MAX_VOXELS_ENV = "MTL_MED_MAX_VOXELS"


def voxel_limit(limit: int | None = None) -> int:
    """The voxel limit in force: ``limit`` if given, else ``$MTL_MED_MAX_VOXELS`` (a whole number or ``2^N``),
    else :data:`MAX_VOXELS`.

    Raises:
        ConfigError: naming ``MTL_MED_MAX_VOXELS`` (or ``max_voxels``) when the value is not a positive number.
    """
    name, value = ("max_voxels", limit) if limit is not None else (MAX_VOXELS_ENV, os.environ.get(MAX_VOXELS_ENV))
    if value is None or value == "":
        return MAX_VOXELS
    text = str(value).strip()
    power = re.fullmatch(r"2\s*(?:\^|\*\*)\s*(\d+)", text)
    try:
        n = 2 ** int(power.group(1)) if power else int(text)
    except ValueError:
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ConfigError(name, f"must be a positive whole number of voxels (or 2^N), got {value!r}")
    return n


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_available() -> int | None:
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this container's memory limit (cgroup v2, then v1): a container is killed there,
    however much memory the host has."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                return max(0, int(limit) - int(usage))
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable (Linux; free pages elsewhere), less where a
    container's memory limit is lower; None where the system does not say (the memory check is then skipped)."""
    known = [m for m in (_meminfo_available() or _sysconf_available(), _cgroup_headroom()) if m is not None]
    return min(known) if known else None


def _one_line(err: BaseException) -> str:
    # nibabel's messages may span lines ("... got 480 bytes from \n - could the file be damaged?")
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _size_text(nbytes: int) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}" if nbytes < 1000 * 1e15 else f"{nbytes:.2g} bytes"
    return f"{nbytes} bytes"


def _limit_text(limit: int) -> str:
    power = limit.bit_length() - 1
    return f"2^{power}" if limit == 2**power else f"{limit:,}"


def check_claimed_size(path: Any, shape: Sequence[int], dtype: Any, *, max_voxels: int | None = None) -> None:
    """Refuse a grid that a header claims before anything is allocated for it.

    Args:
        path: the file (or DICOM folder) named in the error.
        shape: the claimed dimensions (header only; nothing is read).
        dtype: the stored voxel type (numpy dtype or anything ``np.dtype`` takes).
        max_voxels: the voxel limit (None: ``$MTL_MED_MAX_VOXELS``, else :data:`MAX_VOXELS`; see :func:`voxel_limit`).

    Raises:
        InputError: one line naming ``path`` and the claimed size, for a dimension below 1 (empty or corrupt
            header), more voxels than the limit, or more bytes than :func:`available_memory`.
    """
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise InputError(path, f"corrupt header: it claims shape {tuple(dims)}, a negative dimension")
    if any(n == 0 for n in dims):
        raise InputError(path, f"empty volume (the header claims shape {tuple(dims)})")
    dtype = np.dtype(dtype)
    voxels = math.prod(dims)  # Python ints: no overflow however absurd the claim
    nbytes = voxels * dtype.itemsize
    claim = f"header claims {' x '.join(map(str, dims))} voxels of {dtype} ({_size_text(nbytes)})"
    limit = voxel_limit(max_voxels)
    if voxels > limit:
        raise InputError(path, f"{claim}, more than the limit of {_limit_text(limit)} voxels ({MAX_VOXELS_ENV})")
    memory = available_memory()
    if memory is not None and nbytes > memory:
        raise InputError(path, f"{claim}, more than the {_size_text(memory)} of memory available")


def check_series_size(folder: Any, datasets: Sequence[Any], *, max_voxels: int | None = None) -> None:
    """:func:`check_claimed_size` for a DICOM series from its headers (pydicom datasets, no pixel data): columns
    x rows x files (x samples per pixel), at the largest size any slice claims, in the stored integer type.
    Attributes that are missing or unreadable are left to :func:`mtl_med.data.dicom.read_headers`'s own checks."""
    def largest(attr: str, default: int) -> int:
        values = []
        for ds in datasets:
            try:
                values.append(int(getattr(ds, attr, default)))
            except (TypeError, ValueError):
                values.append(default)
        return max(values, default=default)

    shape = [largest("Columns", 1), largest("Rows", 1), len(datasets)]
    if largest("SamplesPerPixel", 1) > 1:  # colour: each pixel holds several samples
        shape.append(largest("SamplesPerPixel", 1))
    bits = largest("BitsAllocated", 16)
    nbytes = next((n for n in (1, 2, 4) if 8 * n >= bits), 8)  # the numpy integer ITK reads the samples into
    dtype = np.dtype(f"{'i' if largest('PixelRepresentation', 0) == 1 else 'u'}{nbytes}")
    check_claimed_size(folder, shape, dtype, max_voxels=max_voxels)


def _series_geometry(path: Any, role: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS+ affine of a DICOM series folder, its voxels read and checked like a NIfTI volume's."""
    from mtl_med.data.dicom import load_series, read_headers

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


def check_array(array: Any, path: Any = "<in-memory volume>", *, role: str = "mr", spatial_ndim: int | None = 3,
                label_table: Mapping[int, Any] | None = None) -> None:
    """Check voxel values of an already-loaded volume (numpy array or tensor).

    Args:
        array: the voxels; a leading channel axis of size 1 is allowed when ``spatial_ndim`` is given.
        path: the name used in error messages.
        role: "mr", "ct", "label" or a mask role ("bone", "body", "mask"); decides the value checks.
        spatial_ndim: required number of spatial axes (None: any).
        label_table: label value -> name, the values a "label" volume may hold; required for that role.

    Raises:
        InputError: empty, wrong dimensionality, NaN / inf voxels, constant MR / CT, label values outside
            ``label_table``, non-binary masks.
        ValueError: a "label" volume checked without ``label_table``.
    """
    if role == "label" and label_table is None:
        raise ValueError(f"checking the label volume {path} needs label_table (label value -> name)")
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
        bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in label_table)]
        if bad:
            raise InputError(
                path, f"label values {bad[:10]} outside the label table {sorted(label_table)} ({label_table})"
            )
    elif role in BINARY_ROLES:
        values = np.unique(arr)
        if not set(values.tolist()) <= {0, 1}:
            raise InputError(path, f"{role} mask must be binary (0/1), found values {values[:10].tolist()}")


def read_header(path: str | os.PathLike, *, role: str = "mr", max_voxels: int | None = None) -> Any:
    """Open an image file lazily (nibabel reads the header only) and check the size it claims; returns the
    nibabel image, its voxels still unread.

    Raises:
        InputError: missing file, unreadable header, a claim beyond the limits (see :func:`check_claimed_size`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{role} file does not exist")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for a bad header
        raise InputError(path, f"cannot read as NIfTI ({_one_line(err)})") from err
    check_claimed_size(path, img.header.get_data_shape(), img.header.get_data_dtype(), max_voxels=max_voxels)
    return img


def check_volume(path: str | os.PathLike, *, role: str = "mr", max_voxels: int | None = None,
                 label_table: Mapping[int, Any] | None = None) -> nib.Nifti1Image:
    """Load a NIfTI volume and check it; returns the nibabel image (data already read and verified). The
    header is checked before any voxel is read: at most ``max_voxels`` voxels (None: ``$MTL_MED_MAX_VOXELS``,
    else :data:`MAX_VOXELS` = 2^30) and no more bytes than the memory available. ``label_table``: the values a
    "label" volume may hold (:func:`check_array`).

    Raises:
        InputError: missing, unreadable or truncated file; a header claiming too large (or an empty / negative)
            grid; not 3D; NaN / inf; see :func:`check_claimed_size` and :func:`check_array`.
    """
    path = Path(path)
    if role == "label" and label_table is None:
        raise ValueError(f"checking the label volume {path} needs label_table (label value -> name)")
    img = read_header(path, role=role, max_voxels=max_voxels)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    if len(img.shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(img.shape)} ({len(img.shape)}D)")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip stream / short file
        raise InputError(path, f"truncated or corrupt voxel data ({_one_line(err)})") from err
    check_array(data, path, role=role, spatial_ndim=3, label_table=label_table)
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


def check_case(item: Mapping[str, Any], *, min_overlap: float = 0.5, keys: Sequence[str] = IMAGE_KEYS,
               label_table: Mapping[int, Any] | None = None) -> None:
    """Check every volume of a datalist item (``{"mr": path, "ct": path, "label": path, ...}``) and that they
    overlap in physical space. Paths must already be resolved (see :func:`check_datalist`). ``label_table``: the
    values a "label" volume may hold, required when the item has one (:func:`check_array`).

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
            img = check_volume(item[key], role=key, label_table=label_table)
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
    label_table: Mapping[int, Any] | None = None,
) -> dict[str, list[dict]]:
    """Read a datalist (file or dict) and check that every file it names exists.

    Paths relative to the datalist's folder (or ``base_dir``) are resolved as MONAI's
    ``load_decathlon_datalist`` does. Returns ``{section: [item, ...]}`` with absolute paths for the sections
    present.

    Args:
        require_targets: training / validation items must have "ct" or "label".
        check_volumes: also run :func:`check_case` on every item (reads every volume).
        label_table: label value -> name, the values a "label" volume may hold (needed with ``check_volumes``
            when an item has a "label").

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
                        from mtl_med.data.dicom import is_series_folder

                        if not is_series_folder(item[key]):
                            raise InputError(item[key], f'folder listed as "{key}" in {sec}[{idx}] of {name} holds '
                                                        "no DICOM files (a DICOM series folder was expected)")
                        continue
                    raise InputError(item[key], f'file listed as "{key}" in {sec}[{idx}] of {name} does not exist')
            if check_volumes:
                check_case(item, min_overlap=min_overlap, label_table=label_table)
    return loaded
