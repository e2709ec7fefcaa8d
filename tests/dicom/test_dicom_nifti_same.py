"""One image stored as a DICOM series and as a NIfTI copy gives the same outputs with N4 on: the series' DS
values carry the spacing to 16 characters, so the two spacings differ by ~1e-7 mm, which once changed N4's fit
(5 HU mean, 86 HU max and 210 labels on an oblique phantom)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mtl_med.build import sfg_highresnet
from mtl_med.data.dicom import load_series, write_mr_series
from mtl_med.pelvis.phantoms import generate_phantom
from mtl_med.inference import Predictor
from mtl_med.transforms import learn_landmarks, save_landmarks

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]


def test_dicom_series_and_nifti_copy_give_the_same_outputs_with_n4(tmp_path):
    ph = generate_phantom(11, shape=(48, 48, 12), mr_spacing=(1.46, 1.46, 1.46), oblique_deg=15.0)
    mr = np.rint(np.asarray(ph.mr, float))  # the series stores int16: the NIfTI copy holds the same voxels
    series = tmp_path / "series"
    write_mr_series(mr, ph.mr_affine, series)
    # the NIfTI copy: the series' voxels, its spacing 1e-6 mm off (a converter's float32 header, DS rounding)
    read = load_series(series)
    affine = np.asarray(read.affine, float)
    affine[:3, 0] *= 1 + 1e-6 / 1.46
    nifti = tmp_path / "copy.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(read[0]).astype(np.int16), affine), str(nifti))
    save_landmarks(tmp_path / "landmarks.json", learn_landmarks([mr]))
    torch.manual_seed(0)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():
        net.heads[0].bias.fill_(1.0)  # around 0 HU, inside the CT range
    torch.save(net.state_dict(), tmp_path / "model.pt")
    pred = Predictor(BUNDLE, ckpt_path=str(tmp_path / "model.pt"), landmarks_path=str(tmp_path / "landmarks.json"),
                     features=TINY, num_samples=1, max_batch=8, margin=4, device="cpu", n4=True, progress=False,
                     save_png=False, compute_dtype="float32")  # bf16 passes round a 1e-6 difference to a bf16 step (~2 HU)
    a = pred.predict_case(str(series))
    b = pred.predict_case(str(nifti))
    np.testing.assert_allclose(a["sct"], b["sct"], atol=0.1)  # HU: the resampling of a 1e-6 mm different grid (N4 once gave 2.5)
    assert (a["seg"] != b["seg"]).sum() == 0
