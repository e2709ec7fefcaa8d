"""The phantom generator of the library (mtl_med.pelvis.phantoms); its command line is tested in tests/data_prep."""

import nibabel as nib
import numpy as np
import pytest

from mtl_med.pelvis.phantoms import PRESETS, generate_phantom, grid_affine, write_phantom


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


# ---------------------------------------------------------------- the varied cohort (training data that covers
# what inference meets: body size, bias field, noise, orientation and storage)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mtl_med.pelvis.phantoms import VARIATION, varied_phantom_kwargs  # noqa: E402

SMALL = (24, 24, 8)


def _world_centroid(ph, label):
    return (ph.mr_affine @ np.r_[np.argwhere(ph.label == label).mean(0), 1])[:3]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), draw=st.integers(0, 2**31 - 1))
def test_varied_phantoms_stay_valid(seed, draw):
    kw = varied_phantom_kwargs(draw)
    ph = generate_phantom(seed, shape=SMALL, **kw)
    assert ph.label.dtype == np.uint8 and set(np.unique(ph.label)) <= {0, 1, 2, 3, 4, 5}
    assert np.all(ph.body[ph.label > 0] == 1)  # organs inside the body
    assert np.array_equal(ph.bone > 0, np.isin(ph.tissue, (3, 4)))
    assert np.isfinite(ph.mr).all() and ph.mr.min() >= 0 and ph.mr.max() > 0
    assert ph.ct.min() >= -1024 and ph.ct.max() <= 3071 and np.all(ph.ct[ph.ct_tissue == 0] == -1024)
    for aff in (ph.mr_affine, ph.ct_affine):  # voxel sizes stay 1.46 mm whatever the rotation and storage
        assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), 1.46)
    if (ph.label == 1).any() and (ph.label == 2).any():  # left femoral head on the patient's left (-x in RAS)
        assert _world_centroid(ph, 1)[0] < _world_centroid(ph, 2)[0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.85, 1.15))
def test_lps_stored_copy_is_the_same_anatomy(seed, scale):
    ras = generate_phantom(seed, shape=SMALL, body_scale=scale)
    lps = generate_phantom(seed, shape=SMALL, body_scale=scale, orientation="LPS")
    # the arrays are stored the other way round in x and y, the affine says so, the world is the same
    assert np.array_equal(ras.label, lps.label[::-1, ::-1])
    assert np.array_equal(ras.tissue, lps.tissue[::-1, ::-1])
    assert np.allclose(ras.mr_clean, lps.mr_clean[::-1, ::-1], rtol=1e-5, atol=1e-3)
    n = np.array(SMALL) - 1
    for ijk in ([0, 0, 0], [n[0], 3, 5], [7, n[1], n[2]]):
        flipped = [n[0] - ijk[0], n[1] - ijk[1], ijk[2]]
        assert np.allclose(ras.mr_affine @ np.r_[ijk, 1], lps.mr_affine @ np.r_[flipped, 1])
    assert nib.aff2axcodes(lps.mr_affine) == ("L", "P", "S") and nib.aff2axcodes(ras.mr_affine) == ("R", "A", "S")


def test_oblique_grid_samples_the_same_anatomy_in_world_space():
    straight = generate_phantom(5, shape=(48, 48, 16))
    oblique = generate_phantom(5, shape=(48, 48, 16), oblique_deg=15.0)
    for lab in (1, 2, 3, 4, 5):  # organ volumes agree within the partial-voxel error
        a, b = (straight.label == lab).sum(), (oblique.label == lab).sum()
        assert abs(a - b) <= 0.2 * a + 4, (lab, a, b)
        assert np.linalg.norm(_world_centroid(straight, lab) - _world_centroid(oblique, lab)) < 1.5 * 1.46


def test_body_scale_resizes_the_anatomy_and_defaults_to_the_preset():
    base = generate_phantom(2, shape=(48, 48, 16))
    assert np.array_equal(generate_phantom(2, shape=(48, 48, 16), body_scale=1.0).mr, base.mr)  # same bytes as before
    small = generate_phantom(2, shape=(48, 48, 16), body_scale=0.85)
    large = generate_phantom(2, shape=(48, 48, 16), body_scale=1.15)
    ratio = large.body.sum() / small.body.sum()  # area in x-y (the z extent is cut by the grid): (1.15 / 0.85)^2
    assert 1.5 < ratio < 2.1
    bladder = (large.label == 4).sum() / (small.label == 4).sum()  # a volume: up to (1.15 / 0.85)^3 = 2.48
    assert 1.8 < bladder < 2.9
    with pytest.raises(ValueError, match="body_scale"):
        generate_phantom(2, shape=SMALL, body_scale=2.0)


def test_varied_kwargs_are_reproducible_and_cover_the_ranges():
    assert varied_phantom_kwargs([3, 1, 1]) == varied_phantom_kwargs([3, 1, 1])
    draws = [varied_phantom_kwargs([7, i, 1]) for i in range(200)]
    for key in ("body_scale", "bias_strength", "mr_noise", "ct_noise"):
        lo, hi = VARIATION[key]
        vals = [d[key] for d in draws]
        assert lo - 1e-6 <= min(vals) and max(vals) <= hi + 1e-6 and max(vals) - min(vals) > 0.6 * (hi - lo)
    assert {d["orientation"] for d in draws} == {"RAS", "LPS"}
    oblique = [abs(d["oblique_deg"]) for d in draws if d["oblique_deg"]]
    assert 60 < len(oblique) < 140 and min(oblique) >= 5 and max(oblique) <= 20
    assert any(d["oblique_deg"] < 0 for d in draws) and any(d["oblique_deg"] > 0 for d in draws)


def test_varied_dataset_records_each_case_and_keeps_the_anatomy_of_its_seed(tmp_path):
    from mtl_med.data.nifti import check_datalist
    from mtl_med.pelvis.phantoms import generate_dataset

    dl, failed = generate_dataset(tmp_path / "v", 4, seed=11, shape=SMALL, varied=True)
    assert not failed and set(dl["variations"]) == {f"case_{i:03d}" for i in range(4)}
    assert sum(len(v) for v in check_datalist(tmp_path / "v" / "datalist.json").values()) == 4
    for name, kw in dl["variations"].items():
        aff = nib.load(tmp_path / "v" / name / "mr.nii.gz").affine
        sign = -1.0 if kw["orientation"] == "LPS" else 1.0  # stored LPS: i runs to the left, j to the back
        assert np.sign(aff[0, 0]) == sign and np.sign(aff[1, 1]) == sign
        angle = np.degrees(np.arctan2(sign * aff[1, 0], sign * aff[0, 0]))  # first column: sign * R(angle) e_x
        assert abs(angle - kw["oblique_deg"]) < 1e-3  # the oblique rotation is in the stored affine
    fixed, _ = generate_dataset(tmp_path / "f", 4, seed=11, shape=SMALL, varied=True, orientation="RAS")
    assert {kw["orientation"] for kw in fixed["variations"].values()} == {"RAS"}  # an explicit value wins
