"""In-memory inputs of the Python API: every kind gives the path's result, in its own geometry, without files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.errors import InputError
from mtl_med.inference import Predictor
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]
OUTPUTS = ("sct", "seg", "sct_std", "seg_uncertainty")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    paths = write_phantom(generate_phantom(5, shape=(32, 32, 8), mr_spacing=(1.3, 1.46, 2.5), oblique_deg=10.0), root)
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(paths["mr"]).get_fdata()]))
    torch.manual_seed(0)
    torch.save(sfg_highresnet(features=TINY).state_dict(), root / "model.pt")
    pred = Predictor(BUNDLE, ckpt_path=str(root / "model.pt"), landmarks_path=str(root / "landmarks.json"),
                     features=TINY, num_samples=2, max_batch=8, device="cpu", n4=False, progress=False, save_png=False)
    return {"paths": paths, "pred": pred, "ref": pred.predict_case(paths["mr"], label=paths["label"])}


def _same(out, ref, transpose=False):
    for key in OUTPUTS:
        a = np.transpose(out[key], (2, 1, 0)) if transpose else out[key]
        np.testing.assert_allclose(a, ref[key], rtol=1e-5, atol=1e-4, err_msg=key)
    assert out["metrics"] == pytest.approx(ref["metrics"], rel=1e-5, abs=1e-5)


def test_every_input_kind_gives_the_path_result(case, monkeypatch):
    img = nib.load(case["paths"]["mr"])
    arr = np.asarray(img.dataobj, np.float32)
    label = nib.load(case["paths"]["label"])
    pred, ref = case["pred"], case["ref"]

    def no_files(*a, **k):
        raise AssertionError("an in-memory input was written to a file")

    monkeypatch.setattr(nib, "save", no_files)
    kinds = {
        "numpy + affine": (arr, img.affine),
        "tensor + affine": (torch.as_tensor(arr), img.affine),
        "nibabel image": (img, None),
        "MetaTensor": (MetaTensor(torch.as_tensor(arr)[None], affine=torch.as_tensor(img.affine)), None),
    }
    for name, (mr, aff) in kinds.items():
        out = pred.predict_case(mr, aff, label=label)
        _same(out, ref)
        assert out["seg"].dtype == np.uint8, name
    # SimpleITK: LPS world and (z, y, x) arrays; the outputs come back in that layout
    s = sitk.ReadImage(case["paths"]["mr"])
    out = pred.predict_case(s, label=sitk.ReadImage(case["paths"]["label"]))
    assert out["sct"].shape == sitk.GetArrayFromImage(s).shape
    _same(out, ref, transpose=True)


def test_metatensor_affine_is_used(case):
    """A MetaTensor of the same anatomy stored with x and y reversed gives the reversed outputs (the affine is
    honoured, not replaced by the identity); one in MONAI's LPS space as well."""
    img = nib.load(case["paths"]["mr"])
    arr = np.asarray(img.dataobj, np.float32)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(arr.shape[:2]) - 1
    mt = MetaTensor(torch.as_tensor(arr[::-1, ::-1].copy()), affine=torch.as_tensor(img.affine @ flip))
    out = case["pred"].predict_case(mt)
    np.testing.assert_allclose(out["sct"][::-1, ::-1], case["ref"]["sct"], rtol=1e-5, atol=1e-4)
    assert (out["seg"][::-1, ::-1] == case["ref"]["seg"]).mean() > 0.999
    lps = MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine),
                     meta={"space": "LPS"})
    np.testing.assert_allclose(case["pred"].predict_case(lps)["sct"], case["ref"]["sct"], rtol=1e-5, atol=1e-4)


def test_in_memory_outputs_are_written_with_the_input_geometry(case, tmp_path):
    img = nib.load(case["paths"]["mr"])
    out = case["pred"].predict_case(np.asarray(img.dataobj), img.affine, output_dir=tmp_path, case="mem")
    for key in OUTPUTS:
        saved = nib.load(out["paths"][key])
        assert saved.shape == img.shape
        np.testing.assert_allclose(saved.affine, img.affine, atol=1e-5)
    assert json.dumps(sorted(p.name for p in (tmp_path / "mem").iterdir()))  # a complete folder, no temporaries
    assert not list(tmp_path.rglob(".*"))


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((8, 8)), "expected a 3D volume"),
    ("not a volume", "does not exist"),
    ({"a": 1}, "cannot use a dict as a volume"),
])
def test_bad_in_memory_inputs_are_named(case, bad, msg):
    with pytest.raises(InputError, match=msg):
        case["pred"].predict_case(bad, np.eye(4))


def test_singular_affine_is_refused(case):
    with pytest.raises(InputError, match="invalid affine"):
        case["pred"].predict_case(np.ones((8, 8, 4), np.float32), np.zeros((4, 4)))
