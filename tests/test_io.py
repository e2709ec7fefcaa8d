"""Atomic writers: a failed write leaves the old file and no temporary."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from mtl_med.io import atomic_save_nifti, atomic_write, atomic_write_json, atomic_write_text


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    target = tmp_path / "out" / "x.nii.gz"
    atomic_save_nifti(img, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError):
        atomic_save_nifti(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), target)
    assert target.read_bytes() == before  # old file intact
    assert [p.name for p in target.parent.iterdir()] == ["x.nii.gz"]  # no temporary left
    assert gzip.decompress(before)[:4]  # a complete gzip stream


def test_writers_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    assert atomic_write_json({"a": 1}, target) == target
    assert json.loads(target.read_text()) == {"a": 1} and target.read_text().endswith("\n")
    atomic_write_text("x,y\r\n1,2\r\n", target)
    assert target.read_bytes() == b"x,y\r\n1,2\r\n"  # newlines as given
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".summary.json.") and tmp.suffix == ".json"
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"x,y\r\n1,2\r\n"
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]
