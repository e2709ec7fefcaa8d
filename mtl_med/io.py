"""Atomic file writers: a temporary name in the destination folder, then ``os.replace``, so a crash never leaves
half a file under the final name and an old file stays intact until the new one is complete.

Typical use::

    with atomic_write("out/model.pt") as tmp:              # any writer that takes a path
        torch.save(state, tmp)
    atomic_save_nifti(img, "out/case_sct.nii.gz")
    atomic_write_json({"num_cases": 3}, "out/summary.json")
    atomic_write_text(csv_text, "out/cases.csv")

Shipped files (a bundle's weights, listed in its ``large_files.yml``) are read-only to every command: no writer
here writes into a folder that holds them (:func:`refuse_shipped`), and reading one checks its MD5
(:func:`verify_shipped`), so a changed file is named instead of giving silently different results.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib

__all__ = ["atomic_write", "atomic_save_nifti", "atomic_write_json", "atomic_write_text", "json_finite", "shipped_files",
           "refuse_shipped", "verify_shipped", "writable_dir"]

LARGE_FILES = "large_files.yml"


@functools.lru_cache(maxsize=32)
def _listed(manifest: Path, mtime_ns: int) -> dict[Path, tuple[str, str]]:
    import yaml

    try:
        entries = (yaml.safe_load(manifest.read_text()) or {}).get("large_files", [])
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    root = manifest.parent
    return {(root / e["path"]).resolve(): (str(e.get("hash_val", "")), str(e.get("hash_type", "md5")))
            for e in entries if isinstance(e, dict) and e.get("path")}


def shipped_files(path: str | os.PathLike) -> dict[Path, tuple[str, str]]:
    """``{file: (hash, hash type)}`` of the bundle ``path`` lies in: the ``large_files.yml`` of the nearest
    folder above it that has one (MONAI's list of a bundle's weights); ``{}`` outside a bundle."""
    here = Path(path).expanduser().resolve()
    for folder in (here, *here.parents):
        manifest = folder / LARGE_FILES
        if manifest.is_file():
            return _listed(manifest, manifest.stat().st_mtime_ns)
    return {}


def refuse_shipped(path: str | os.PathLike, what: str = "output") -> None:
    """Raise :class:`~mtl_med.errors.InputError` when ``path`` (a file or a folder to write into) lies in a folder
    that holds a bundle's shipped files (or is that folder): nothing is written beside the shipped weights."""
    from mtl_med.errors import InputError

    target = Path(path).expanduser().resolve()
    for shipped in shipped_files(target):
        if target == shipped.parent or shipped.parent in target.parents:
            raise InputError(target, f"{what} would go into {shipped.parent}, which holds the bundle's shipped weights "
                                     f"({LARGE_FILES}); they are read-only: choose another folder")


def writable_dir(path: str | os.PathLike, name: str = "ckpt_dir") -> str:
    """Create the folder ``path`` that a run writes into and return it; refused (a ConfigError naming the config
    id ``name``) when it holds a bundle's shipped weights, e.g. ``ckpt_dir`` merged from ``configs/demo.json``."""
    from mtl_med.errors import ConfigError, InputError

    try:
        refuse_shipped(path, what="training output")
    except InputError as err:
        raise ConfigError(name, f"{err.path} is where the bundle's shipped weights are ({LARGE_FILES}), which no "
                                f"command writes; give another folder (--{name} DIR)") from None
    os.makedirs(path, exist_ok=True)
    return str(path)


def verify_shipped(path: str | os.PathLike) -> Path:
    """``path``; when it is a file listed in its bundle's ``large_files.yml``, its hash is checked first.

    Raises:
        InputError: naming the file, when its hash differs from the listed one.
    """
    from mtl_med.errors import InputError

    path = Path(path)
    listed = shipped_files(path).get(path.expanduser().resolve())
    if listed and listed[0]:
        want, kind = listed
        digest = hashlib.new(kind.lower())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != want.lower():
            raise InputError(path, f"{kind} {digest.hexdigest()} differs from {want} in {LARGE_FILES}: the shipped "
                                   "file was changed; restore it (git checkout -- <file>)")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder (same suffixes) and move it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    refuse_shipped(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # readable like any file the user writes (mkstemp makes it 0600)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write a nibabel image atomically (``.nii.gz`` is compressed; gzip header has no time stamp)."""
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def json_finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None (JSON has neither), through dicts and lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


def atomic_write_json(obj: Any, path: str | os.PathLike, *, indent: int = 2) -> Path:
    """Write JSON atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text (CSV, JSON, ...) atomically, newlines as given."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    return Path(path)
