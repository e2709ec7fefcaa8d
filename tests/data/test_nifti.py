"""Bad input: every check names the file and the problem."""

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mtl_med.data
import mtl_med.data.nifti
from mtl_med.data.nifti import check_case, check_datalist, check_volume
from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.errors import InputError
from mtl_med.pelvis import CT_RANGE_HU, CT_SCALE, LABEL_TABLE
from mtl_med.transforms import preprocess_transforms


def _save(path, arr, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def case(tmp_path):
    paths = write_phantom(generate_phantom(0, shape=(24, 24, 8)), tmp_path / "case")
    return {k: paths[k] for k in ("mr", "ct", "label")}


def test_good_volume_passes(case):
    img = check_volume(case["mr"], role="mr")
    assert img.shape == (24, 24, 8)
    check_case(case, label_table=LABEL_TABLE)


@pytest.mark.parametrize(
    "name, make, role, problem",
    [
        ("trunc.nii.gz", "truncated", "mr", r"truncated|cannot read"),
        ("cut.nii.gz", "cut", "mr", r"truncated or corrupt voxel data"),
        ("junk.nii.gz", "junk", "mr", "cannot read as NIfTI"),
        ("nan.nii.gz", "nan", "mr", r"1 NaN and 0 inf voxels"),
        ("inf.nii.gz", "inf", "ct", r"0 NaN and 2 inf voxels"),
        ("four.nii.gz", "4d", "mr", r"expected a 3D volume, got shape \(4, 4, 4, 2\)"),
        ("two.nii.gz", "2d", "mr", r"expected a 3D volume, got shape \(8, 8\)"),
        ("flat.nii.gz", "constant", "mr", "empty mr volume"),
        ("lab.nii.gz", "label7", "label", r"label values \[7\] outside the label table"),
        ("labf.nii.gz", "labelfrac", "label", r"label values \[2.5\] outside"),
        ("missing.nii.gz", None, "ct", "ct file does not exist"),
    ],
)
def test_bad_volumes(tmp_path, case, name, make, role, problem):
    path = tmp_path / name
    good = nib.load(case["mr"]).get_fdata(dtype=np.float32)
    if make == "truncated":
        path.write_bytes(Path(case["mr"]).read_bytes()[:300])
    elif make == "cut":  # header intact, voxel data cut short
        raw = gzip.decompress(Path(case["mr"]).read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif make == "junk":
        path.write_bytes(b"this is not an image")
    elif make == "nan":
        good[1, 2, 3] = np.nan
        _save(path, good)
    elif make == "inf":
        good[1, 2, 3], good[0, 0, 0] = np.inf, -np.inf
        _save(path, good)
    elif make == "4d":
        _save(path, np.ones((4, 4, 4, 2), np.float32))
    elif make == "2d":
        _save(path, np.ones((8, 8), np.float32))
    elif make == "constant":
        _save(path, np.zeros((8, 8, 8), np.float32))
    elif make == "label7":
        _save(path, np.full((8, 8, 8), 7, np.uint8))
    elif make == "labelfrac":
        _save(path, np.full((8, 8, 8), 2.5, np.float32))
    with pytest.raises(InputError, match=problem) as err:
        check_volume(path, role=role, label_table=LABEL_TABLE)
    assert str(err.value).startswith(str(path) + ": ")
    assert err.value.path == str(path)
    # the loading pipeline raises the same error before any processing
    with pytest.raises(InputError, match=problem):
        preprocess_transforms(("mr", "ct", "label"), n4=False, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE)({**case, role: str(path)})


def test_label_values_are_checked_against_the_table_the_caller_gives(tmp_path, case):
    """The generic checks hold no label table: a label is checked against the caller's, and never without one."""
    path = tmp_path / "lab.nii.gz"
    _save(path, np.full((8, 8, 8), 7, np.uint8))
    assert check_volume(path, role="label", label_table={0: "background", 7: "other"}).shape == (8, 8, 8)
    for check in (lambda: check_volume(path, role="label"), lambda: check_case(case),
                  lambda: preprocess_transforms(("mr", "label"), n4=False)):
        with pytest.raises(ValueError, match="label_table"):
            check()


def test_empty_volume(tmp_path):
    path = tmp_path / "empty.nii.gz"
    _save(path, np.zeros((0, 4, 4), np.float32))
    with pytest.raises(InputError, match="empty"):
        check_volume(path)


def test_no_physical_overlap(tmp_path, case):
    img = nib.load(case["ct"])
    aff = img.affine.copy()
    aff[:3, 3] += 500.0
    moved = tmp_path / "ct_moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(moved))
    with pytest.raises(InputError, match=r"ct_moved\.nii\.gz: ct does not overlap mr .*mr\.nii\.gz"):
        check_case({**case, "ct": str(moved)}, label_table=LABEL_TABLE)
    with pytest.raises(InputError, match="does not overlap"):
        preprocess_transforms(("mr", "ct", "label"), n4=False, ct_clip=CT_RANGE_HU, ct_scale=CT_SCALE, label_table=LABEL_TABLE)({**case, "ct": str(moved)})


def test_datalist_checks(tmp_path, case):
    root = tmp_path / "case"
    dl = {"training": [{"mr": "mr.nii.gz", "ct": "ct.nii.gz", "label": "label.nii.gz"}],
          "test": [{"mr": "mr.nii.gz"}]}
    (root / "dl.json").write_text(json.dumps(dl))
    out = check_datalist(root / "dl.json", check_volumes=True, label_table=LABEL_TABLE)
    assert out["training"][0]["mr"] == str(root / "mr.nii.gz")  # relative to the datalist's folder
    dl["validation"] = [{"mr": "mr.nii.gz", "label": "gone.nii.gz"}]
    (root / "dl2.json").write_text(json.dumps(dl))
    with pytest.raises(InputError, match=r"gone\.nii\.gz: file listed as \"label\" in validation\[0\]"):
        check_datalist(root / "dl2.json")
    (root / "dl3.json").write_text(json.dumps({"training": [{"ct": "ct.nii.gz"}]}))
    with pytest.raises(InputError, match=r'dl3\.json: training\[0\] has no "mr" entry'):
        check_datalist(root / "dl3.json")
    (root / "dl4.json").write_text("{not json")
    with pytest.raises(InputError, match=r"dl4\.json: cannot read datalist JSON"):
        check_datalist(root / "dl4.json")
    with pytest.raises(InputError, match="has none of the sections"):
        check_datalist({"foo": []})


def test_datalist_named_by_a_relative_path(tmp_path, case, monkeypatch):
    root = tmp_path / "case"
    (root / "dl.json").write_text(json.dumps({"training": [{"mr": "mr.nii.gz"}]}))
    monkeypatch.chdir(tmp_path)
    out = check_datalist(Path("case") / "dl.json")
    assert Path(out["training"][0]["mr"]) == root / "mr.nii.gz"


def test_input_error_is_one_class_wherever_it_is_imported_from():
    """The checks raise :class:`mtl_med.errors.InputError`; the old import paths name the same class."""
    assert mtl_med.data.nifti.InputError is InputError and mtl_med.data.InputError is InputError
    with pytest.raises(InputError):
        check_volume("/nonexistent/mr.nii.gz")
