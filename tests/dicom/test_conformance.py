"""The DICOM outputs (CT series, SEG, RTSTRUCT) and the phantom MR series against the reference validator
(dicom3tools' dciodvfy) and pydicom's strict reading, on an oblique grid with a spacing whose floats need more
than the 16 characters a DS value may hold; and the series reader's answer to truncated slices and to files
that are not DICOM beside a series."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, keyword_for_tag

from mtl_med.data import dicom
from mtl_med.pelvis.phantoms import generate_phantom
from mtl_med.errors import InputError
from mtl_med.inference import dicom_outputs
from mtl_med.pelvis import LABEL_TABLE

pytest.importorskip("highdicom")

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed: "
                                                              "apt-get install dicom3tools, as .ci/setup does")
OUTPUTS = ("mr", "ct", "seg", "rtstruct")
GEOMETRY = {"mr": "ImagePositionPatient", "ct": "ImagePositionPatient", "seg": "ImagePositionPatient",
            "rtstruct": "ContourData"}  # a DS attribute each output holds long floats in
SPACING = (1.4599998, 1.2700001, 2.9999999)  # floats whose repr needs 17 and more characters once rotated


def oblique_affine():
    """RAS+ affine rotated 17.3 degrees about the superior axis and tilted 8.1 degrees about the right-left
    one, with non-round spacing and origin: every position and cosine is a long float."""
    a, b = np.deg2rad(17.3), np.deg2rad(8.1)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = about_r @ about_s @ np.diag(SPACING)
    aff[:3, 3] = (-20.123456789, -15.987654321, -9.111111111)
    return aff


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A phantom MR series and the three outputs written on its grid; the files of each output by name."""
    root = tmp_path_factory.mktemp("conformance")
    ph = generate_phantom(5, shape=(24, 20, 6))
    aff = oblique_affine()
    mr_files = dicom.write_mr_series(ph.mr / ph.mr.max() * 1000.0, aff, root / "mr")
    src = dicom.read_headers(root / "mr")
    np.testing.assert_allclose(src.affine_ras, aff, atol=1e-4)  # read in the written order: labels need no mapping
    hu = np.random.default_rng(0).uniform(-1024.0, 2500.0, src.shape)
    return {
        "root": root, "src": src, "affine": aff, "hu": hu,
        "mr": mr_files,
        "ct": dicom_outputs.write_ct_series(hu, src, root / "ct"),
        "seg": [dicom_outputs.write_seg(ph.label, src, root / "seg.dcm", label_table=LABEL_TABLE)],
        "rtstruct": [dicom_outputs.write_rtstruct(ph.label, src, root / "rtstruct.dcm", label_table=LABEL_TABLE)],
    }


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@needs_dciodvfy
@pytest.mark.parametrize("output", OUTPUTS)
def test_dciodvfy_finds_no_error(outputs, output):
    """Every file of the output is a valid instance of its IOD (CT Image, Segmentation, RT Structure Set,
    MR Image) to the reference validator: DS lengths, type 1 and 2 attributes, the Frame of Reference module."""
    errors = {p.name: _dciodvfy_errors(p) for p in outputs[output]}
    assert not any(errors.values()), {name: lines for name, lines in errors.items() if lines}


def _ds_strings(ds) -> list[tuple[str, str]]:
    """(keyword, value) of every DS value in ``ds`` and its sequences, as the file stores it (read before
    pydicom converts the element)."""
    found = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = raw.VR or dictionary_VR(tag)
        if vr == "SQ":
            for item in ds[tag].value:
                found += _ds_strings(item)
        elif vr == "DS" and isinstance(raw, RawDataElement) and raw.value:
            found += [(keyword_for_tag(tag), v.decode("ascii").strip()) for v in raw.value.split(b"\\")]
    return found


@pytest.mark.parametrize("output", OUTPUTS)
def test_every_ds_value_fits_16_characters_under_strict_reading(outputs, output, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    for path in outputs[output]:
        ds = pydicom.dcmread(path)
        strings = _ds_strings(ds)
        assert any(k == GEOMETRY[output] for k, _ in strings)  # the geometry is among them
        too_long = [(k, v) for k, v in strings if len(v) > 16]
        assert not too_long, f"{path.name}: {too_long}"
        list(ds.iterall())  # every element converted under the strict mode: nothing else it refuses


def test_writers_pass_pydicoms_strict_writing_validation(outputs, tmp_path, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
    ph = generate_phantom(5, shape=(24, 20, 6))
    dicom.write_mr_series(ph.mr, outputs["affine"], tmp_path / "mr")
    src = dicom.read_headers(tmp_path / "mr")
    dicom_outputs.write_ct_series(outputs["hu"], src, tmp_path / "ct")
    dicom_outputs.write_seg(ph.label, src, tmp_path / "seg.dcm", label_table=LABEL_TABLE)
    dicom_outputs.write_rtstruct(ph.label, src, tmp_path / "rtstruct.dcm", label_table=LABEL_TABLE)


def test_ct_series_keeps_the_source_geometry_and_hu_through_the_rounding(outputs):
    """16-character DS values lose digits, not geometry: the CT series read back by ITK lies on the MR's grid
    and on the grid it was made for, to 1e-4 mm, with the HU rounded to integers."""
    mr = dicom.load_series(outputs["root"] / "mr")
    ct = dicom.load_series(outputs["root"] / "ct", role="ct", modality="CT")
    assert ct.shape == mr.shape
    np.testing.assert_allclose(np.asarray(ct.affine, float), np.asarray(mr.affine, float), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ct.affine, float), outputs["affine"], rtol=0, atol=1e-4)
    assert np.abs(np.asarray(ct[0], float) - outputs["hu"]).max() <= 0.5 + 1e-6


def _copy_mr(outputs, folder: Path) -> list[Path]:
    shutil.copytree(outputs["root"] / "mr", folder)
    return sorted(folder.iterdir())


def _rle(path: Path) -> None:
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)  # encapsulated pixel data: undefined length, ended by a delimiter
    ds.save_as(path)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize("cut", ["half", "last bytes", "header", "compressed"])
def test_truncated_slice_is_named_before_any_voxel_is_read(outputs, tmp_path, monkeypatch, cut):
    files = _copy_mr(outputs, tmp_path / "mr")
    if cut == "compressed":
        for f in files:
            _rle(f)
    bad = files[2]
    data = bad.read_bytes()
    keep = {"half": len(data) // 2, "header": 300}.get(cut, len(data) - 10)
    bad.write_bytes(data[:keep])

    def no_voxels(*args, **kwargs):
        raise AssertionError("ITK was asked for the voxels of a series with a truncated slice")

    monkeypatch.setattr("monai.transforms.LoadImage", no_voxels)
    with pytest.raises(InputError, match=re.escape(str(bad)) + r": (truncated|unreadable or truncated)"):
        dicom.load_series(tmp_path / "mr")


def test_files_beside_a_series_that_are_not_dicom_are_ignored_with_one_warning(outputs, tmp_path, caplog):
    _copy_mr(outputs, tmp_path / "mr")
    junk = {"README.txt": b"scanned 2024-01-02\n", ".DS_Store": b"\0\0\0\1Bud1" + bytes(500),
            "Thumbs.db": bytes(range(256)) * 4, "report.pdf": b"%PDF-1.4\n" + bytes(300)}
    for name, data in junk.items():
        (tmp_path / "mr" / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="mtl_med.data.dicom"):
        img = dicom.load_series(tmp_path / "mr")
    assert tuple(img.shape[1:]) == outputs["src"].shape
    warnings = [r for r in caplog.records if r.name == "mtl_med.data.dicom" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert str(tmp_path / "mr") in message and all(name in message for name in junk)
