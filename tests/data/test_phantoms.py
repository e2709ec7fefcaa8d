"""The phantom generator of the library (mtl_med.data.phantoms); its command line is tested in tests/data_prep."""

import nibabel as nib
import numpy as np
import pytest

from mtl_med.data.phantoms import PRESETS, generate_phantom, grid_affine, write_phantom


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
    paths = write_phantom(ph, tmp_path)
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
    assert PRESETS["paper"] == (288, 288, 62)
    aff = grid_affine((288, 288, 62), (1.46,) * 3)
    assert np.allclose(np.diag(aff)[:3], 1.46)
