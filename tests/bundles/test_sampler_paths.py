"""The bundle's sampler is the Python API's: same seed, same slice batches, same numbers; argmax reports one pass."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.inference import Predictor, evaluate_cases, sample_posterior
from mtl_med.build import sfg_highresnet
from mtl_med.pelvis import CT_SCALE
from mtl_med.transforms import learn_landmarks, save_landmarks
from mtl_med.transforms.intensity import network_to_hu

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sampler")
    paths = write_phantom(generate_phantom(11, shape=(32, 32, 8), mr_spacing=(1.46, 1.6, 3.0), oblique_deg=10.0), root)
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(paths["mr"]).get_fdata()]))
    torch.manual_seed(0)
    torch.save(sfg_highresnet(features=TINY).state_dict(), root / "model.pt")
    overrides = {"ckpt_path": str(root / "model.pt"), "landmarks_path": str(root / "landmarks.json"), "features": TINY,
                 "device": "cpu", "n4": False, "progress": False, "save_png": False}
    yield {"root": root, "paths": paths, "overrides": overrides}
    torch.set_num_threads(n)


def test_bundle_path_equals_sample_posterior(env):
    """``VolumePredictor.sample`` (SliceInferer, sw_batch_size slices a batch, the config's margin) against
    ``sample_posterior`` over the same slice batches in the same order with the same seed."""
    pred = Predictor(BUNDLE, **env["overrides"], num_samples=5, max_batch=12, seed=3)
    data = pred.preprocess({"mr": env["paths"]["mr"]})
    maps = pred.sample(data)
    vol = data["mr"].as_tensor().float()  # 1, X, Y, Z; the inferer slices along Z
    sw, depth = pred.inferer.sw_batch_size, vol.shape[-1]
    assert pred.inferer.spatial_dim == 2 and depth > sw and pred.margin > 0
    g = pred.generator()
    ref = []
    for z0 in range(0, depth, sw):
        x = vol[..., z0:z0 + sw].permute(3, 0, 1, 2).contiguous()  # slices, 1, X, Y
        ref.append(sample_posterior(pred.network, x, num_samples=5, samples_per_batch=max(1, 12 // x.shape[0]),
                                    regression=("sct",), labels={"seg": 6}, generator=g, margin=pred.margin))
    ref = {k: torch.cat([r[k] for r in ref]).permute(1, 2, 3, 0) for k in ref[0]}
    assert torch.equal(maps["sct"], network_to_hu(ref["sct"], pred.ct_clip, CT_SCALE))
    assert torch.equal(maps["sct_std"], ref["sct_std"] * CT_SCALE) and maps["sct_std"].max() > 0
    assert torch.equal(maps["seg"], ref["seg"])
    # the predictor renormalises the stitched vote frequencies (blending): equal up to rounding
    torch.testing.assert_close(maps["seg_disagreement"], ref["seg_disagreement"], rtol=0, atol=1e-6)
    torch.testing.assert_close(maps["seg_entropy"], ref["seg_entropy"], rtol=0, atol=1e-6)


def test_argmax_mode_reports_one_sample(env, tmp_path, caplog):
    pred = Predictor(BUNDLE, **env["overrides"], num_samples=7, inference_mode="argmax")
    assert pred.num_samples == 1 and pred.sampler.requested_samples == 7 and pred.inference_mode == "argmax"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"mr": env["paths"]["mr"], "label": env["paths"]["label"]}]}))
    with caplog.at_level(logging.INFO, logger="mtl_med.inference"):
        evaluate_cases(pred, str(datalist), metrics_dir=tmp_path / "metrics")
    summary = json.loads((tmp_path / "metrics" / "metrics_summary.json").read_text())
    assert summary["num_samples"] == 1 and summary["inference_mode"] == "argmax"
    text = caplog.text
    assert "1 posterior samples (argmax mode)" in text and "1 posterior samples of every axial slice" in text
    assert "1-sample inference" in text and "7 posterior" not in text and "7-sample" not in text
