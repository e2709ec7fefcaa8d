import json

import pytest

from data_prep import synthrad
from mtl_med.data.nifti import check_datalist
from mtl_med.pelvis.phantoms import generate_phantom
from mtl_med.errors import InputError
from mtl_med.io import atomic_save_nifti


def _tree(root, cases=("1PA001", "1PA004", "1PC012")):
    import nibabel as nib

    for i, name in enumerate(cases):
        ph = generate_phantom(i)
        imgs = ph.images()
        d = root / "Task1" / "pelvis" / name
        atomic_save_nifti(imgs["mr"], d / "mr.nii.gz")
        atomic_save_nifti(imgs["ct"], d / "ct.nii.gz")
        atomic_save_nifti(nib.Nifti1Image(ph.body, ph.mr_affine), d / "mask.nii.gz")
    return root


def test_convert_synthesis_only_items(tmp_path):
    src = _tree(tmp_path / "synthrad")
    out = tmp_path / "out"
    assert synthrad.main(["--src", str(src), "--out", str(out), "--quiet"]) == 0
    dl = check_datalist(out / "datalist.json", check_volumes=True)
    items = [x for v in dl.values() for x in v]
    assert len(items) == 3
    assert all(set(x) == {"mr", "ct", "body"} for x in items)  # no organ labels in SynthRAD
    # also accepts the pelvis folder itself
    assert synthrad.main(["--src", str(src / "Task1" / "pelvis"), "--out", str(tmp_path / "o2"), "--quiet"]) == 0


def test_non_empty_output_folder_is_refused_unless_overwrite(tmp_path, capsys, caplog):
    src = _tree(tmp_path / "s", cases=("1PA001",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a datalist")  # any entry makes the folder non-empty
    with pytest.raises(SystemExit) as e:
        synthrad.main(["--src", str(src), "--out", str(out), "--quiet"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"python -m data_prep.synthrad: error: {out}: output folder is not empty (1 entry, "
                                       "no readable datalist.json); pass --overwrite to write into it anyway\n")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "not a datalist"
    assert synthrad.main(["--src", str(src), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert f"{out}: --overwrite: existing files of the same name are replaced" in caplog.text
    assert (out / "1PA001" / "mr.nii.gz").is_file() and (out / "notes.txt").is_file()  # nothing else is deleted


def test_bad_case_skipped_and_named(tmp_path, caplog):
    src = _tree(tmp_path / "s")
    (src / "Task1/pelvis/1PA004/mask.nii.gz").unlink()
    (src / "Task1/pelvis/1PC012/ct.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    out = tmp_path / "out"
    assert synthrad.main(["--src", str(src), "--out", str(out), "--quiet"]) == 1
    assert "1PA004: missing file(s) ['mask.nii.gz']" in caplog.text
    assert "1PC012/ct.nii.gz: cannot read as NIfTI" in caplog.text or "1PC012/ct.nii.gz: truncated" in caplog.text
    dl = json.loads((out / "datalist.json").read_text())
    assert len(dl["training"] + dl["validation"] + dl["test"]) == 1
    assert not (out / "1PA004").exists() and not (out / "1PC012").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no SynthRAD pelvis cases"):
        synthrad.find_cases(tmp_path / "empty")
