import numpy as np
import torch
from monai.transforms import Compose

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.transforms import LoadVolumesd, invert_to_input, resample_transforms
from mtl_med.pelvis import LABEL_TABLE


def _load(paths, keys=("mr", "ct", "label")):
    return LoadVolumesd(keys, label_table=LABEL_TABLE)({k: paths[k] for k in keys})


def test_round_trip_isotropic_is_exact(tmp_path):
    paths = write_phantom(generate_phantom(5), tmp_path)
    d = _load(paths)
    orig_label = d["label"].clone()
    orig_aff = d["mr"].affine.clone()
    t = resample_transforms(("mr", "ct", "label"), pixdim=1.46)
    r = t(d)
    assert r["mr"].shape == orig_label.shape  # already 1.46 mm: nothing resampled
    assert torch.equal(r["label"].as_tensor(), orig_label.as_tensor())
    back = invert_to_input("label", t, nearest_interp=True)(dict(r))
    assert tuple(back["label"].shape) == tuple(orig_label.shape)
    assert torch.allclose(back["label"].affine, orig_aff, atol=1e-4)
    assert torch.equal(back["label"].as_tensor(), orig_label.as_tensor())


def test_anisotropic_oblique_onto_one_grid_and_back(tmp_path):
    ph = generate_phantom(6, shape=(48, 48, 32), mr_spacing=(1.46, 1.46, 5.0), ct_spacing=(0.98, 0.98, 1.5),
                          oblique_deg=12.0)
    paths = write_phantom(ph, tmp_path)
    d = _load(paths)
    in_shape, in_aff = tuple(d["mr"].shape), d["mr"].affine.clone()
    assert tuple(d["ct"].shape) != in_shape
    t = resample_transforms(("mr", "ct", "label"), pixdim=1.46)
    r = t(d)
    sp = np.linalg.norm(r["mr"].affine[:3, :3].numpy(), axis=0)
    assert np.allclose(sp, 1.46, atol=1e-4)
    for k in ("ct", "label"):  # every key on the MR's new grid
        assert r[k].shape == r["mr"].shape and torch.allclose(r[k].affine, r["mr"].affine, atol=1e-4)
    assert set(np.unique(r["label"].numpy())) <= set(range(6))
    # CT tissue at the MR's bone voxels is bone-like (same physical space)
    assert float(r["ct"][r["label"] == 1].mean()) > 200
    back = invert_to_input(["label", "ct"], Compose([t]), nearest_interp=[True, False])(dict(r))
    assert tuple(back["label"].shape) == in_shape
    assert torch.allclose(back["label"].affine, in_aff, atol=1e-4)
    agree = (back["label"].numpy() == ph.label[None]).mean()
    assert agree > 0.97
