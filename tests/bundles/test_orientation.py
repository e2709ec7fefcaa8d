"""The same anatomy stored four legal ways gives the same answer in world space (the flagship's demo weights on
a slab of a phantom through the femoral heads): as generated (RAS), x and y flipped (LPS-style), axes permuted
so the axial direction is array axis 0, and an oblique grid. Training volumes are oriented the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import nibabel as nib
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom
from mtl_med.inference import Predictor
from mtl_med.transforms import preprocess_transforms, train_patch_transforms
from mtl_med.pelvis import LABEL_TABLE

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"

SLAB = 8  # axial slices around the femoral heads: the network is 2D, so the slab keeps the test short


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _slab(ph, k0):
    aff = ph.mr_affine.copy()
    aff[:3, 3] += aff[:3, 2] * k0
    return ph.mr[:, :, k0:k0 + SLAB], ph.label[:, :, k0:k0 + SLAB], aff


def flip_xy(arr, aff):
    """The same voxels stored with the first two array axes reversed (world positions unchanged)."""
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    f[:2, 3] = np.asarray(arr.shape[:2]) - 1
    return arr[::-1, ::-1, :].copy(), aff @ f


def axial_first(arr, aff):
    """The same voxels stored with the axial (third) axis as array axis 0."""
    p = np.zeros((4, 4))
    p[2, 0] = p[0, 1] = p[1, 2] = p[3, 3] = 1
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), aff @ p


UNDO = {"flipped": lambda a: a[::-1, ::-1, :], "permuted": lambda a: a.transpose(1, 2, 0)}


@pytest.fixture(scope="module")
def storages(tmp_path_factory):
    root = tmp_path_factory.mktemp("storages")
    ph = generate_phantom(1000, shape=(96, 96, 32))
    heads = np.isin(ph.label, (1, 2)).sum((0, 1))
    k0 = int(np.clip(heads.argmax() - SLAB // 2, 0, ph.label.shape[2] - SLAB))
    mr, lab, aff = _slab(ph, k0)
    oblique = generate_phantom(1000, shape=(96, 96, 32), oblique_deg=20.0)  # same anatomy, rotated grid
    omr, olab, oaff = _slab(oblique, k0)
    out = {"asis": (mr, lab, aff), "oblique": (omr, olab, oaff)}
    for name, store in (("flipped", flip_xy), ("permuted", axial_first)):
        out[name] = (store(mr, aff)[0], *store(lab, aff))
    paths = {}
    for name, (m, l, a) in out.items():
        (root / name).mkdir()
        nib.save(nib.Nifti1Image(m.astype(np.float32), a), str(root / name / "mr.nii.gz"))
        nib.save(nib.Nifti1Image(l.astype(np.uint8), a), str(root / name / "label.nii.gz"))
        paths[name] = {"mr": str(root / name / "mr.nii.gz"), "label": str(root / name / "label.nii.gz")}
    return paths


@pytest.fixture(scope="module")
def results(storages):
    pred = Predictor(BUNDLE, [CONFIGS / "inference.json", CONFIGS / "demo.json"], num_samples=2, device="cpu",
                     progress=False, save_png=False)
    return {name: pred.predict_case(p["mr"], label=p["label"]) for name, p in storages.items()}


def _centre_x(mask, affine):
    """World x (RAS: + is the patient's right) of a mask's centroid."""
    return float((affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3])[0])


def test_flipped_and_permuted_storage_give_the_same_answer(storages, results):
    ref = results["asis"]
    organs = np.asarray(nib.load(storages["asis"]["label"]).dataobj) > 0
    for name in ("flipped", "permuted"):
        out = {k: UNDO[name](v) for k, v in results[name].items() if isinstance(v, np.ndarray)}
        assert (out["seg"][organs] == ref["seg"][organs]).mean() >= 0.99, name
        assert np.abs(out["sct"] - ref["sct"]).mean() < 1.0, name  # HU
        assert np.abs(out["sct"] - ref["sct"]).max() < 25.0, name
        assert results[name]["metrics"]["dice_mean"] == pytest.approx(ref["metrics"]["dice_mean"], abs=0.01)


def test_femoral_heads_are_labelled_on_the_anatomical_side(storages, results):
    for name, out in results.items():
        aff = nib.load(storages[name]["mr"]).affine
        assert _centre_x(out["seg"] == 1, aff) < -10, name  # left femoral head: patient's left, -x in RAS
        assert _centre_x(out["seg"] == 2, aff) > 10, name
        assert out["metrics"]["dice_left_femoral_head"] > 0.3 and out["metrics"]["dice_right_femoral_head"] > 0.3, name


def test_oblique_storage_gives_the_same_answer(results):
    ref, obl = results["asis"]["metrics"], results["oblique"]["metrics"]
    print({k: (round(ref[k], 3), round(obl[k], 3)) for k in ref})
    organs = [k for k, v in ref.items() if k.startswith("dice_") and k != "dice_mean" and np.isfinite(v)]
    assert len(organs) >= 3  # the slab holds both femoral heads and more
    for organ in organs:
        assert obl[organ] == pytest.approx(ref[organ], abs=0.15), organ
    assert obl["dice_mean"] == pytest.approx(ref["dice_mean"], abs=0.06)


def test_training_volumes_are_oriented_the_same_way(storages):
    """What training caches and samples patches from: identical arrays and affines for every storage."""
    pre = preprocess_transforms(("mr", "label"), n4=False, label_table=LABEL_TABLE)
    vols = {name: pre(dict(p)) for name, p in storages.items() if name != "oblique"}
    ref = vols["asis"]
    for name, d in vols.items():
        assert torch.equal(d["mr"].as_tensor(), ref["mr"].as_tensor()), name
        assert torch.equal(d["label"].as_tensor(), ref["label"].as_tensor()), name
        np.testing.assert_allclose(d["mr"].affine, ref["mr"].affine, atol=1e-4)
        assert np.allclose(np.diag(d["mr"].affine)[:3], 1.46)  # RAS, world-aligned: axis 2 is axial
    patches = {name: train_patch_transforms(("mr", "label"), patch_size=(32, 32), padded_size=(40, 40), seed=3)(d)
               for name, d in vols.items()}
    for name, p in patches.items():
        assert torch.equal(torch.as_tensor(p["mr"]), torch.as_tensor(patches["asis"]["mr"])), name


def test_training_and_inference_configs_record_one_orientation():
    import json

    meta = json.loads((CONFIGS / "metadata.json").read_text())["preprocessing"]
    for name in ("train.json", "inference.json"):
        cfg = json.loads((CONFIGS / name).read_text())
        assert cfg["axcodes"] == meta["orientation"] == "RAS", name
        assert cfg["pixdim"] == meta["pixdim"], name
    assert json.loads((CONFIGS / "inference.json").read_text())["slice_axis"] == meta["slice_axis"] == 2
