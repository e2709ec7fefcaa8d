import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mtl_med.pelvis.phantoms import generate_phantom
from mtl_med.errors import InputError
from mtl_med.transforms import N4BiasFieldCorrectiond
from mtl_med.transforms.n4 import N4BiasFieldCorrection, n4_bias_field, shrink_factors


def _meta(arr, affine, name="phantom_mr.nii.gz"):
    t = MetaTensor(torch.as_tensor(arr[None].copy()), affine=torch.as_tensor(affine))
    t.meta["filename_or_obj"] = name
    return t


def _cv(a, m):
    return float(a[m].std() / a[m].mean())


@pytest.fixture(scope="module")
def biased():
    # strong bias, little noise: the muscle CV is then dominated by the bias field
    return generate_phantom(1, shape=(48, 48, 16), bias_strength=0.6, mr_noise=0.005)


def test_n4_halves_muscle_cv_and_recovers_truth(biased):
    ph = biased
    out = N4BiasFieldCorrectiond("mr", shrink_factor=2, num_threads=2, field_postfix="field")(
        {"mr": _meta(ph.mr, ph.mr_affine)})
    corr = out["mr"][0].numpy()
    muscle = ph.tissue == 2
    assert _cv(corr, muscle) <= 0.5 * _cv(ph.mr, muscle)
    body = ph.body > 0
    r_in = np.corrcoef(ph.mr[body], ph.mr_clean[body])[0, 1]
    r_out = np.corrcoef(corr[body], ph.mr_clean[body])[0, 1]
    assert r_out > r_in
    # the estimated field follows the true one (up to a global scale)
    f = out["mr_field"][0]
    assert np.corrcoef(np.log(f[body]), np.log(ph.bias[body]))[0, 1] > 0.9
    assert isinstance(out["mr"], MetaTensor) and torch.equal(out["mr"].affine, torch.as_tensor(ph.mr_affine))


def test_n4_anisotropic_spacing():
    ph = generate_phantom(2, shape=(48, 48, 32), mr_spacing=(1.46, 1.46, 5.0), bias_strength=0.6, mr_noise=0.005)
    assert ph.mr.shape == (48, 48, 9)
    assert shrink_factors((1.46, 1.46, 5.0), 2) == [2, 2, 1]
    corr = N4BiasFieldCorrection(shrink_factor=2, num_threads=2)(_meta(ph.mr, ph.mr_affine))[0].numpy()
    muscle = ph.tissue == 2
    assert _cv(corr, muscle) < 0.7 * _cv(ph.mr, muscle)


def test_n4_cache(tmp_path, biased):
    ph = biased
    t = N4BiasFieldCorrection(shrink_factor=2, num_threads=2, cache_dir=tmp_path)
    a = t(_meta(ph.mr, ph.mr_affine))
    assert t.last_cache_hit is False and len(list(tmp_path.glob("*.npy"))) == 1
    b = t(_meta(ph.mr, ph.mr_affine))
    assert t.last_cache_hit is True
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    # the key changes with the content, the spacing and the parameters
    sp = (1.46, 1.46, 1.46)
    k = t.cache_key(ph.mr, sp, None)
    assert k != t.cache_key(ph.mr * 1.01, sp, None)
    assert k != t.cache_key(ph.mr, (1.46, 1.46, 3.0), None)
    assert k != N4BiasFieldCorrection(shrink_factor=3, cache_dir=tmp_path).cache_key(ph.mr, sp, None)


def test_n4_rejects_non_finite(biased):
    arr = biased.mr.copy()
    arr[3, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"bad_mr\.nii\.gz: .*NaN"):
        N4BiasFieldCorrectiond("mr", shrink_factor=2)({"mr": _meta(arr, biased.mr_affine, "bad_mr.nii.gz")})


def _max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(a)))


@pytest.mark.parametrize("shrink", [2, 4])
@pytest.mark.parametrize(
    "a, b",
    [
        ((1.46, 1.46, 1.46), (1.460001, 1.46, 1.46)),
        ((1.46, 1.46, 1.46), (float(np.float32(1.46)),) * 3),  # a NIfTI copy stores float32 spacings
        ((0.9765625, 0.9765625, 0.9765625), (0.97656251, 0.97656251, 0.97656251)),
        ((0.9765625, 0.9765625, 3.0), (0.97656251, 0.9765625, 3.000001)),
        ((1.46, 1.46, 5.0), (1.46, 1.460001, 4.999999)),
        ((1.25, 1.25, 2.0), (1.25, 1.25, 1.9999999)),  # 4 * 1.25 / 2 = 2.5: a shrink factor at a rounding edge
    ],
)
def test_n4_field_ignores_negligible_spacing_differences(biased, shrink, a, b):
    """A DICOM series and its NIfTI copy (spacings equal to 1e-6 mm) get the same bias field, to float rounding."""
    fa = n4_bias_field(biased.mr, a, shrink_factor=shrink, num_threads=2)
    fb = n4_bias_field(biased.mr, b, shrink_factor=shrink, num_threads=2)
    assert _max_rel(fa, fb) < 1e-5
    t = N4BiasFieldCorrection(shrink_factor=shrink)
    assert t.cache_key(biased.mr, a, None) == t.cache_key(biased.mr, b, None)  # one cache entry for both


def test_n4_transform_ignores_negligible_spacing_differences(biased):
    """Through the transform: the spacing comes from the MetaTensor's affine (float32 in a NIfTI header)."""
    t = N4BiasFieldCorrection(shrink_factor=4, num_threads=2)
    aff = np.diag([1.46, 1.46, 1.46, 1.0])
    _, fa = t(_meta(biased.mr, aff), return_field=True)
    _, fb = t(_meta(biased.mr, np.diag([1.460001, 1.46, 1.46, 1.0])), return_field=True)
    assert _max_rel(fa, fb) < 1e-5


def test_n4_field_follows_real_spacing_changes(biased):
    """A real spacing change: an isotropic rescale keeps the field (the B-spline lattice has a fixed number of
    control points per axis), a coarser slice spacing changes the shrink factors, and each field still
    recovers the true bias."""
    body = biased.body > 0
    iso = n4_bias_field(biased.mr, (1.46, 1.46, 1.46), shrink_factor=4, num_threads=2)
    assert _max_rel(iso, n4_bias_field(biased.mr, (2.0, 2.0, 2.0), shrink_factor=4, num_threads=2)) < 1e-5
    thick = n4_bias_field(biased.mr, (1.46, 1.46, 4.0), shrink_factor=4, num_threads=2)
    assert shrink_factors((1.46, 1.46, 4.0), 4) == [4, 4, 1]
    assert _max_rel(iso, thick) > 1e-3
    for f in (iso, thick):
        assert np.corrcoef(np.log(f[body]), np.log(biased.bias[body]))[0, 1] > 0.9


def test_shrink_factors_snap_spacing_to_tolerance():
    assert shrink_factors((1.25, 1.25, 2.0), 4) == shrink_factors((1.25, 1.25, 1.9999999), 4)
    assert shrink_factors((1.25, 1.25, 1.9999999), 4, spacing_tol=0) == [4, 4, 3]  # without snapping: the edge
    with pytest.raises(ValueError, match="spacing_tol"):
        shrink_factors((1.0, 1.0, 1.0), 4, spacing_tol=-1)
