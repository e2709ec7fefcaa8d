import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med.errors import InputError
from mtl_med.transforms import (
    DEFAULT_QUANTILES,
    HistogramStandardize,
    HistogramStandardized,
    apply_landmarks,
    learn_landmarks,
    load_landmarks,
    save_landmarks,
)


def _mrs(phantom_set):
    _, dl = phantom_set
    return [nib.load(x["mr"]).get_fdata(dtype=np.float32) for x in dl["training"]]


def test_landmarks_monotonic_and_in_standard_range(phantom_set):
    lm = learn_landmarks(_mrs(phantom_set))
    assert len(lm) == len(DEFAULT_QUANTILES)
    assert np.all(np.diff(lm) > 0)
    assert lm[0] == pytest.approx(0.0) and lm[-1] == pytest.approx(100.0)


def test_mapping_piecewise_linear_and_monotonic(phantom_set):
    imgs = _mrs(phantom_set)
    lm = learn_landmarks(imgs, foreground_method="all")
    x = imgs[0]
    mask = np.ones(x.shape, bool)
    y = apply_landmarks(x, lm, mask)
    # the image's own quantiles land on the landmarks
    p = np.percentile(x, 100 * np.asarray(DEFAULT_QUANTILES))
    assert np.allclose(np.interp(p, np.sort(x.ravel()), np.sort(y.ravel())), lm, atol=1e-2)
    # monotonic: sorting the input sorts the output
    order = np.argsort(x.ravel(), kind="stable")
    assert np.all(np.diff(y.ravel()[order]) >= -1e-4)
    # linear between consecutive quantiles: equal input steps give equal output steps
    seg = (x > p[3]) & (x < p[4])
    xs, ys = x[seg], y[seg]
    slope = np.polyfit(xs, ys, 1)
    assert np.allclose(np.polyval(slope, xs), ys, atol=1e-3)
    # beyond the 99th percentile the last segment is extended (no clipping)
    assert y.max() > lm[-1]


def test_standardised_output_zero_mean_unit_variance(phantom_set, tmp_path):
    imgs = _mrs(phantom_set)
    path = save_landmarks(tmp_path / "lm.json", learn_landmarks(imgs), num_images=len(imgs))
    d = HistogramStandardized("mr", landmarks=path)({"mr": torch.as_tensor(imgs[1][None])})
    from mtl_med.transforms.n4 import otsu_mask

    fg = otsu_mask(imgs[1])
    out = d["mr"][0].numpy()
    assert abs(out[fg].mean()) < 1e-3 and abs(out[fg].std() - 1) < 1e-3


def test_landmarks_file_round_trip_and_checks(tmp_path):
    lm = np.linspace(0, 100, len(DEFAULT_QUANTILES)) ** 1.1 / 100 ** 0.1
    path = save_landmarks(tmp_path / "lm.json", lm, modality="mr")
    info = load_landmarks(path, modality="mr")
    assert np.array_equal(info["landmarks"], lm)
    assert np.array_equal(info["quantiles"], np.asarray(DEFAULT_QUANTILES))
    with pytest.raises(InputError, match=r"lm\.json: .*modality 'mr', not 'ct'"):
        load_landmarks(path, modality="ct")
    with pytest.raises(InputError, match="lm.json"):
        HistogramStandardized("ct", landmarks=path, modality="ct")
    obj = json.loads(path.read_text())
    obj["landmarks"][3] = obj["landmarks"][2] - 1
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(InputError, match=r"bad\.json: .*strictly increasing"):
        load_landmarks(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text(path.read_text()[:40])
    with pytest.raises(InputError, match=r"trunc\.json: cannot read"):
        load_landmarks(tmp_path / "trunc.json")
    with pytest.raises(InputError, match="does not exist"):
        load_landmarks(tmp_path / "missing.json")


def test_agrees_with_torchio(phantom_set):
    tio = pytest.importorskip("torchio")
    from torchio.transforms.preprocessing.intensity.histogram_standardization import _get_percentiles

    _, dl = phantom_set
    paths = [x["mr"] for x in dl["training"]]
    # TorchIO's landmarks are 1st, 10th, 20th, 25th, ..., 75th, ..., 99th percentiles; ours skip the quartiles
    assert np.array_equal(_get_percentiles((1, 99)), [1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99])
    ours_idx = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]
    tio_lm = tio.HistogramStandardization.train(paths, progress=False)
    ours = learn_landmarks(_mrs(phantom_set), foreground_method="all")
    assert np.allclose(ours, tio_lm[ours_idx], atol=1e-4)
    # same mapping of an image
    img = nib.load(dl["validation"][0]["mr"])
    arr = img.get_fdata(dtype=np.float32)
    subject = tio.Subject(mr=tio.ScalarImage(tensor=torch.as_tensor(arr[None]), affine=img.affine))
    theirs = tio.HistogramStandardization({"mr": tio_lm})(subject)["mr"].data[0].numpy()
    mine = HistogramStandardize(ours, foreground_method="all", normalize=False)(arr)
    assert np.allclose(mine, theirs, atol=1e-3 * np.abs(theirs).max())
