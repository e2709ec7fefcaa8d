import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep import phantoms
from data_prep.phantoms import generate_phantom, grid_affine
from mtl_med.data.nifti import check_datalist

ROOT = Path(__file__).resolve().parents[2]


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_datalist(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert phantoms.main(["--out", str(a), "--cases", "3", "--seed", "4", "--quiet"]) == 0
    assert phantoms.main(["--out", str(b), "--cases", "3", "--seed", "4", "--quiet"]) == 0
    assert phantoms.main(["--out", str(c), "--cases", "3", "--seed", "5", "--quiet"]) == 0
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert da == db
    assert da["case_000/mr.nii.gz"] != dc["case_000/mr.nii.gz"]
    assert not [n for n in da if ".tmp" in n]  # no temporary files left
    dl = check_datalist(a / "datalist.json")
    assert sum(len(v) for v in dl.values()) == 3 and len(dl["training"]) >= 1
    raw = json.loads((a / "datalist.json").read_text())
    assert raw["training"][0]["mr"].endswith("/mr.nii.gz") and not raw["training"][0]["mr"].startswith("/")


def test_command_line_entry_point(tmp_path, capsys):
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-m", "data_prep.phantoms", "--out", str(out), "--cases", "2", "--seed", "0",
                        "--preset", "small"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 2 cases" in r.stdout and "generating case_001" in r.stderr
    good = ["--out", str(tmp_path / "q"), "--seed", "0"]
    for args in (good + ["--cases", "0"], good + ["--cases", "x"], good + ["--cases", "1", "--preset", "huge"],
                 good + ["--cases", "1", "--mr-spacing", "1,2"], ["--cases", "1", "--seed", "0"]):
        with pytest.raises(SystemExit) as e:
            phantoms.main(args)
        assert e.value.code == 2 and "usage:" in capsys.readouterr().err, args
    assert not (tmp_path / "q").exists()


def test_non_empty_output_folder_is_refused_unless_overwrite(tmp_path, capsys, caplog):
    out = tmp_path / "p"
    args = ["--out", str(out), "--cases", "2", "--shape", "24", "24", "8", "--quiet"]
    assert phantoms.main(args + ["--seed", "0"]) == 0
    before = _digests(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another seed into the same folder would mix two runs
        phantoms.main(args + ["--seed", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"python -m data_prep.phantoms: error: {out}: output folder is not empty "
                                       "(2 cases from an earlier run); pass --overwrite to write into it anyway\n")
    assert _digests(out) == before  # nothing written, not even a temporary
    assert phantoms.main(args + ["--seed", "1", "--overwrite"]) == 0
    assert f"{out}: --overwrite: existing files of the same name are replaced" in caplog.text
    after = _digests(out)
    assert after.keys() == before.keys() and after["case_000/mr.nii.gz"] != before["case_000/mr.nii.gz"]
    (tmp_path / "empty").mkdir()  # an empty folder (made beforehand) is no earlier run
    assert phantoms.main(["--out", str(tmp_path / "empty"), "--cases", "1", "--seed", "0", "--shape", "8", "8", "4",
                          "--quiet"]) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ct_values_per_tissue(seed):
    ph = generate_phantom(seed, shape=(64, 64, 24))
    t, ct = ph.ct_tissue, ph.ct.astype(float)
    assert np.all(ct[t == 0] == -1024)  # background
    assert -150 <= ct[t == 1].mean() <= -50  # fat
    assert 20 <= ct[t == 2].mean() <= 60  # muscle
    assert 0 <= ct[t == 5].mean() <= 20  # urine in the bladder
    assert 20 <= ct[t == 6].mean() <= 60  # prostate
    bone = ct[(t == 3) | (t == 4)]
    assert np.percentile(bone, 5) >= 250 and bone.max() >= 1500
    if (t == 8).any():
        assert -1024 <= ct[t == 8].mean() <= -950  # rectal gas
    # labels of all organs, left femoral head on the patient's left (-x in RAS)
    assert set(np.unique(ph.label)) == {0, 1, 2, 3, 4, 5}
    xs = {k: (ph.mr_affine @ np.r_[np.argwhere(ph.label == k).mean(0), 1])[0] for k in (1, 2)}
    assert xs[1] < 0 < xs[2]


def test_mr_contrast_and_saved_bias(tmp_path):
    ph = generate_phantom(3, mr_noise=0.0)
    assert np.allclose(ph.mr, ph.bias * ph.mr_clean, rtol=1e-5, atol=1e-3)
    paths = phantoms.write_phantom(ph, tmp_path)
    assert np.array_equal(nib.load(paths["bias"]).get_fdata(dtype=np.float32), ph.bias)
    assert ph.bias.min() < 0.95 and ph.bias.max() > 1.05
    # bone and air both dark in MR, unlike CT
    m = {k: ph.mr_clean[ph.tissue == k].mean() for k in (0, 2, 3, 5)}
    assert m[3] < 0.2 * m[2] and m[0] < 0.2 * m[2] and m[5] > m[2]
    noisy = generate_phantom(3)
    assert noisy.mr.min() >= 0  # Rician magnitude
    assert np.array_equal(nib.load(paths["bone"]).get_fdata() > 0, np.isin(ph.tissue, (3, 4)))


def test_anisotropic_grids_share_physical_space():
    ph = generate_phantom(0, shape=(96, 96, 32), mr_spacing=(1.46, 1.46, 5.0), ct_spacing=(0.98, 0.98, 1.5),
                          oblique_deg=10.0)
    assert ph.mr.shape == (96, 96, 9) and ph.ct.shape == (143, 143, 31)
    for aff, sp in ((ph.mr_affine, (1.46, 1.46, 5.0)), (ph.ct_affine, (0.98, 0.98, 1.5))):
        assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), sp)
        assert not np.allclose(aff[:3, :3] / sp, np.eye(3))  # oblique direction cosines
    centre = lambda shape, aff: aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]  # noqa: E731
    assert np.allclose(centre(ph.mr.shape, ph.mr_affine), centre(ph.ct.shape, ph.ct_affine), atol=1e-6)
    # bladder voxels of the MR map to urine on the CT grid
    pts = ph.mr_affine @ np.c_[np.argwhere(ph.label == 4), np.ones((ph.label == 4).sum())].T
    ijk = np.round(np.linalg.inv(ph.ct_affine) @ pts)[:3].astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(ph.ct.shape)[:, None]), axis=0)
    assert (ph.ct_tissue[tuple(ijk[:, ok])] == 5).mean() > 0.8


def test_paper_preset_grid():
    assert phantoms.PRESETS["paper"] == (288, 288, 62)
    aff = grid_affine((288, 288, 62), (1.46,) * 3)
    assert np.allclose(np.diag(aff)[:3], 1.46)
