"""Atomic file writers: a temporary name in the destination folder, then ``os.replace``, so a crash never leaves
half a file under the final name and an old file stays intact until the new one is complete.

Typical use::

    with atomic_write("out/model.pt") as tmp:              # any writer that takes a path
        torch.save(state, tmp)
    atomic_save_nifti(img, "out/case_sct.nii.gz")
    atomic_write_json({"num_cases": 3}, "out/summary.json")
    atomic_write_text(csv_text, "out/cases.csv")
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib

__all__ = ["atomic_write", "atomic_save_nifti", "atomic_write_json", "atomic_write_text"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder (same suffixes) and move it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
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
