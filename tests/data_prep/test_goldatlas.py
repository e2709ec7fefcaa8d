import json

import nibabel as nib
import numpy as np
import pytest

from data_prep import goldatlas
from mtl_med.data.nifti import check_case
from mtl_med.errors import InputError
from mtl_med.pelvis import LABEL_TABLE

LABELS = {"Femur_Head_L": 1, "Femur_Head_R": 2, "Prostate": 3, "Bladder": 4, "Rectum": 5}


def test_convert_patient_labels_and_geometry(goldatlas_tree, organs, tmp_path):
    root, _ = goldatlas_tree()
    out = tmp_path / "out"
    assert goldatlas.main(["--src", str(root), "--out", str(out), "--quiet"]) == 0
    dl = json.loads((out / "datalist.json").read_text())
    items = dl["training"] + dl["validation"] + dl["test"]
    assert items == [{"mr": "1_01_P/mr.nii.gz", "ct": "1_01_P/ct.nii.gz", "label": "1_01_P/label.nii.gz"}]
    case = {k: str(out / v) for k, v in items[0].items()}
    check_case(case, label_table=LABEL_TABLE)
    lab, mr = nib.load(case["label"]), nib.load(case["mr"])
    assert lab.shape == mr.shape == (32, 32, 5)
    assert np.allclose(lab.affine, mr.affine)
    arr = np.asarray(lab.dataobj)
    assert set(np.unique(arr).tolist()) == {0, 1, 2, 3, 4, 5}
    inv = np.linalg.inv(lab.affine)
    for name, (cx, cy, h) in organs.items():
        for k, z in enumerate((0.0, 2.0, 4.0, 6.0, 8.0)):
            i, j, kk = np.round(inv @ [-cx, -cy, z, 1.0])[:3].astype(int)  # DICOM LPS -> NIfTI RAS
            assert kk == k
            assert arr[i, j, k] == (LABELS[name] if 1 <= k <= 3 else 0), (name, k)
        # the square's area: (2h / 2 mm)^2 voxels per slice, three slices
        assert abs(int((arr == LABELS[name]).sum()) - 3 * (2 * h / 2) ** 2) <= 3 * 4 * (2 * h / 2)


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_non_empty_output_folder_is_refused_unless_overwrite(goldatlas_tree, tmp_path, capsys, caplog):
    root, _ = goldatlas_tree()
    out = tmp_path / "out"
    args = ["--src", str(root), "--out", str(out), "--quiet"]
    assert goldatlas.main(args) == 0
    before = _files(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        goldatlas.main(args + ["--seed", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"python -m data_prep.goldatlas: error: {out}: output folder is not empty "
                                       "(1 patient from an earlier run); pass --overwrite to write into it anyway\n")
    assert _files(out) == before
    assert goldatlas.main(args + ["--seed", "1", "--overwrite"]) == 0
    assert f"{out}: --overwrite: existing files of the same name are replaced" in caplog.text


def test_consensus_preferred_and_explicit_names():
    names = ["Bladder_obs1", "Bladder_consensus", "Rectum", "Prostate_obs2", "FemurHead_L", "FemurHead_R"]
    with pytest.raises(InputError, match="no ROI for label 3|ambiguous"):
        goldatlas.match_rois(names + ["Prostate_obs1"], goldatlas.Path("rt.dcm"))
    m = goldatlas.match_rois(names, goldatlas.Path("rt.dcm"))
    assert m == {1: "FemurHead_L", 2: "FemurHead_R", 3: "Prostate_obs2", 4: "Bladder_consensus", 5: "Rectum"}
    m = goldatlas.match_rois(names, goldatlas.Path("rt.dcm"), explicit={"Bladder_obs1": 4})
    assert m[4] == "Bladder_obs1"


def test_missing_rtstruct_fails_that_patient_only(goldatlas_tree, tmp_path, caplog):
    root, _ = goldatlas_tree(patient="1_01_P")
    goldatlas_tree(root=root, patient="1_02_P", with_rtstruct=False)
    out = tmp_path / "out"
    assert goldatlas.main(["--src", str(root), "--out", str(out), "--quiet"]) == 1
    assert (out / "1_01_P" / "label.nii.gz").is_file()
    assert not (out / "1_02_P").exists()  # nothing written for the bad patient
    assert "1_02_P: expected one RTSTRUCT file, found 0" in caplog.text
    dl = json.loads((out / "datalist.json").read_text())
    assert len(dl["training"] + dl["validation"] + dl["test"]) == 1


def test_clear_errors(goldatlas_tree, tmp_path):
    root, folder = goldatlas_tree(roi_names={"Prostate": "Gland"})
    with pytest.raises(InputError, match=r"rtstruct\.dcm: no ROI for label 3"):
        goldatlas.convert_patient(folder, tmp_path / "o")
    with pytest.raises(InputError, match=r"expected one MR-registered CT series .* found 0"):
        goldatlas.convert_patient(folder, tmp_path / "o", ct_pattern="nothing")
    root2, folder2 = goldatlas_tree(root=tmp_path / "g2", ct_offset=5000.0)
    with pytest.raises(InputError, match="does not overlap"):
        goldatlas.convert_patient(folder2, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        goldatlas.main(["--src", str(root), "--out", str(tmp_path / "o"), "--roi", "Bladder"])
    assert e.value.code == 2
