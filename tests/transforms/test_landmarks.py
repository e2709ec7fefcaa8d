"""learn_from_datalist: landmarks learned over a datalist's training section (the library side of
``python -m data_prep.landmarks`` and of the pelvis bundle's train.json)."""

import nibabel as nib
import numpy as np

from mtl_med.transforms import learn_from_datalist, learn_landmarks, load_landmarks, preprocess_transforms


def test_learn_from_datalist_skips_bad_volumes(phantom_set, tmp_path):
    folder, dl = phantom_set
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), bad)
    items = [{"mr": it["mr"]} for it in dl["training"]]
    datalist = {"training": items + [{"mr": str(bad)}]}
    out, failed = learn_from_datalist(datalist, tmp_path / "lm.json", n4=False, foreground_method="all",
                                      progress=False)
    assert failed == [str(bad)]
    info = load_landmarks(out, modality="mr")
    assert info["num_images"] == len(items)
    pre = preprocess_transforms(("mr",), landmarks=None, n4=False, pixdim=None)
    expected = learn_landmarks([pre({"mr": it["mr"]})["mr"] for it in items], foreground_method="all")
    assert np.allclose(info["landmarks"], expected)


def test_learn_from_datalist_nothing_usable(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), bad)
    out, failed = learn_from_datalist({"training": [{"mr": str(bad)}]}, tmp_path / "lm.json", n4=False,
                                      progress=False)
    assert out is None and failed == [str(bad)] and not (tmp_path / "lm.json").exists()
