"""Inference and evaluation half of the sfg_highresnet_pelvis bundle, on small phantoms made here."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.errors import InputError
from mtl_med.inference import CaseFailures, ConcatTaskOutputs, Predictor, bundle_parser, load_checkpoint, predict_case
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TINY = [4, 8, 8]
OUTPUTS = ("sct", "seg", "sct_std", "seg_uncertainty")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny volumes: threads only contend with other test runs
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two phantoms with anisotropic MR spacing and oblique directions, landmarks, a random-init checkpoint."""
    root = tmp_path_factory.mktemp("pelvis")
    cases = []
    for i, (sp, obl) in enumerate((((1.46, 1.8, 3.0), 15.0), ((1.3, 1.46, 2.5), -20.0))):
        ph = generate_phantom(100 + i, shape=(32, 32, 8), mr_spacing=sp, oblique_deg=obl)
        cases.append(write_phantom(ph, root / f"case_{i}"))
    save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(c["mr"]).get_fdata() for c in cases]))
    torch.manual_seed(0)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():  # synthetic CT around 0 HU, inside the clipped range, so that the sampling seed shows
        net.heads[0].bias.fill_(1.0)
    torch.save(net.state_dict(), root / "model.pt")
    datalist = {"test": [{"mr": c["mr"], "ct": c["ct"], "label": c["label"], "bone": c["bone"]} for c in cases]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    overrides = {
        "ckpt_path": str(root / "model.pt"), "landmarks_path": str(root / "landmarks.json"), "features": TINY,
        "num_samples": 3, "max_batch": 12, "device": "cpu", "n4": False, "progress": False, "save_png": False,
        "truth_geometry": "resample",  # the phantoms' CT has a grid of its own (rotated further than the MR)
    }
    return {"root": root, "cases": cases, "overrides": overrides}


def _ref(path):
    return nib.load(str(path))


@pytest.mark.skipif(not SCHEMA.is_file(), reason="offline copy of MONAI's metadata schema not found in ../shared")
def test_metadata_verifies_against_schema():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert "mtl_med" in meta["required_packages_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 7  # 1 sCT + 6 label logits


def test_outputs_on_input_grid_and_in_range(env, tmp_path):
    pred = Predictor(BUNDLE, **{**env["overrides"], "save_png": True})
    res = pred.run(datalist=str(env["root"] / "datalist.json"), section="test", output_dir=tmp_path)
    assert not res["failed"] and len(res["cases"]) == 2
    for c in env["cases"]:
        case = Path(c["mr"]).parent.name  # case_0/mr.nii.gz: names come from the folders
        ref = _ref(c["mr"])
        assert not np.allclose(ref.affine[:3, :3] / np.abs(ref.affine[:3, :3]).max(0), np.eye(3))  # oblique
        for key in OUTPUTS:
            img = _ref(tmp_path / case / f"{case}_{key}.nii.gz")
            assert img.shape == ref.shape, key
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5, err_msg=key)
        data = {k: np.asarray(_ref(tmp_path / case / f"{case}_{k}.nii.gz").dataobj) for k in OUTPUTS}
        assert data["seg"].dtype == np.uint8 and set(np.unique(data["seg"])) <= set(range(6))
        assert data["sct"].min() >= -1024 and data["sct"].max() <= 2500
        assert data["sct_std"].min() >= 0 and data["sct_std"].max() > 0  # 3 samples of a random SFG net vary
        assert data["seg_uncertainty"].min() >= 0 and data["seg_uncertainty"].max() <= 1
        assert (tmp_path / case / f"{case}_overview.png").stat().st_size > 1000
        assert {"psnr_overall", "psnr_bones", "psnr_prostate", "mae_overall", "dice_mean"} <= set(res["cases"][case]["metrics"])
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_single_pass_has_zero_std(env, mode):
    out = predict_case(env["cases"][0]["mr"], bundle=BUNDLE, **{**env["overrides"], "num_samples": 1, "inference_mode": mode})
    assert out["sct"].shape == _ref(env["cases"][0]["mr"]).shape
    assert np.all(out["sct_std"] == 0) and np.all(out["seg_uncertainty"] == 0)


def test_same_seed_same_outputs_different_seed_different_samples(env):
    mr = _ref(env["cases"][1]["mr"])
    arr, aff = np.asarray(mr.dataobj, np.float32), mr.affine  # array in, as a pipeline would call it
    runs = [predict_case(arr, aff, bundle=BUNDLE, **{**env["overrides"], "seed": s}) for s in (7, 7, 8)]
    for key in OUTPUTS:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
    assert not np.array_equal(runs[0]["sct"], runs[2]["sct"])
    assert not np.array_equal(runs[0]["sct_std"], runs[2]["sct_std"])


def test_folder_with_bad_files_via_bundle_run(env, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = env["cases"][0]["mr"]
    (src / "good.nii.gz").write_bytes(Path(good).read_bytes())
    (src / "corrupt.nii.gz").write_bytes(Path(good).read_bytes()[:400])  # truncated file
    ref = _ref(good)
    nan = np.asarray(ref.dataobj, np.float32).copy()
    nan[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, ref.affine), str(src / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 2), np.float32), ref.affine), str(src / "fourd.nii.gz"))
    o = env["overrides"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
           "--input_dir", "in", "--output_dir", "out", "--ckpt_path", o["ckpt_path"],
           "--landmarks_path", o["landmarks_path"], "--features", json.dumps(TINY), "--num_samples", "2",
           "--n4", "False", "--progress", "False", "--device", "$torch.device('cpu')"]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert "3 of 4 cases failed" in log, log[-3000:]
    for name, problem in (("corrupt", "corrupt.nii.gz"), ("nan", "NaN"), ("fourd", "4D")):
        assert problem in log, log[-3000:]
        assert not (tmp_path / "out" / name).exists()
    for key in OUTPUTS:  # relative input_dir / output_dir resolved against the current directory
        assert _ref(tmp_path / "out" / "good" / f"good_{key}.nii.gz").shape == ref.shape
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good"]
    assert not [p for p in (tmp_path / "out").rglob(".*")]


def test_checkpoint_from_cuda_loads_with_map_location(env, tmp_path):
    """A checkpoint whose tensors are tagged as CUDA storages (as a GPU run saves them) loads on this device."""
    net = sfg_highresnet(features=TINY)
    registry = torch.serialization._package_registry
    entry = (-1, lambda obj: "cuda:0", lambda obj, loc: None)
    registry.insert(0, entry)  # tag every storage as cuda:0 while saving
    try:
        torch.save(net.state_dict(), tmp_path / "gpu.pt")
    finally:
        registry.remove(entry)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)  # what loading without map_location does
    other = sfg_highresnet(features=TINY)
    load_checkpoint(other, tmp_path / "gpu.pt", map_location=torch.device("cpu"))
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v) and other.state_dict()[k].device.type == "cpu"
    pred = Predictor(BUNDLE, **{**env["overrides"], "ckpt_path": str(tmp_path / "gpu.pt")})
    assert torch.equal(pred.network.state_dict()["heads.0.weight"], net.state_dict()["heads.0.weight"])


def test_mismatched_checkpoint_and_missing_landmarks_are_named(env, tmp_path):
    with pytest.raises(InputError, match=r"model\.pt: checkpoint does not match the network") as err:
        Predictor(BUNDLE, **{**env["overrides"], "features": [4, 8, 16]})
    assert "size mismatch" in str(err.value) or "Missing" in str(err.value)
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint file does not exist"):
        Predictor(BUNDLE, **{**env["overrides"], "ckpt_path": str(tmp_path / "nope.pt")})
    with pytest.raises(InputError, match=r"missing_landmarks\.json: landmarks file does not exist"):
        Predictor(BUNDLE, **{**env["overrides"], "landmarks_path": str(tmp_path / "missing_landmarks.json")})
    assert not list(tmp_path.iterdir())  # nothing written


def test_verify_net_in_out_and_torchscript_export(env, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    common = dict(net_id="network_export_def", meta_file=str(CONFIGS / "metadata.json"),
                  config_file=str(CONFIGS / "inference.json"), features=TINY)
    verify_net_in_out(**common, device="cpu", any=16)
    ts = tmp_path / "model.ts"
    ckpt_export(**common, filepath=str(ts), ckpt_file=env["overrides"]["ckpt_path"], use_trace=True,
                input_shape=[1, 1, 24, 24])
    exported = torch.jit.load(str(ts))
    net = sfg_highresnet(features=TINY)
    load_checkpoint(net, env["overrides"]["ckpt_path"])
    ref = ConcatTaskOutputs(net, mode="argmax").eval()
    x = torch.randn(1, 1, 20, 28)  # another slice size; a trace keeps the batch size of input_shape
    with torch.no_grad():
        np.testing.assert_allclose(exported(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-5)
    assert ref(x).shape == (1, 7, 20, 28)


def test_evaluate_writes_case_csv_and_summary(env, tmp_path):
    parser = bundle_parser(BUNDLE, [CONFIGS / "inference.json", CONFIGS / "evaluate.json"], **env["overrides"],
                           datalist=str(env["root"] / "datalist.json"), output_dir=str(tmp_path))
    parser.get_parsed_content("evaluate")
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case_0", "case_1"]
    for col in ("psnr_overall", "psnr_bones", "psnr_organs", "psnr_prostate", "psnr_bladder", "psnr_rectum",
                "mae_overall", "dice_left_femoral_head", "dice_rectum", "dice_mean"):
        assert col in rows[0]
        assert np.isfinite(float(rows[0][col])) or col.startswith("dice")
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    m = summary["metrics"]["psnr_overall"]
    vals = [float(r["psnr_overall"]) for r in rows]
    assert m["n"] == 2 and m["mean"] == pytest.approx(np.mean(vals), rel=1e-5)
    assert m["std"] == pytest.approx(np.std(vals), abs=1e-3)  # the CSV keeps 6 significant digits
    assert not list(tmp_path.glob("case_*"))  # evaluation alone writes no volumes by default
    assert [r["resampled_to_mr"] for r in rows] == ["ct", "ct"]  # the CT was not on the MR grid: said so


def test_evaluation_refuses_truth_on_another_grid(env, tmp_path):
    case = env["cases"][0]
    pred = Predictor(BUNDLE, **{**env["overrides"], "truth_geometry": "raise"})
    with pytest.raises(InputError, match=r"ct\.nii\.gz: ct grid \(32, 32, 8\) does not match the MR .*mr\.nii\.gz grid"):
        pred.predict_case(case["mr"], ct=case["ct"], label=case["label"])
    mr = _ref(case["mr"])  # a label of another shape, and one on a shifted grid, are refused as well
    lab = np.asarray(_ref(case["label"]).dataobj)
    nib.save(nib.Nifti1Image(lab[:, :, :-1], mr.affine), str(tmp_path / "short.nii.gz"))
    shifted = mr.affine.copy()
    shifted[:3, 3] += 0.5
    nib.save(nib.Nifti1Image(lab, shifted), str(tmp_path / "shifted.nii.gz"))
    for name, what in (("short", r"grid \(32, 26, 3\)"), ("shifted", r"grid .*largest affine difference 0\.5 mm")):
        with pytest.raises(InputError, match=rf"{name}\.nii\.gz: label {what}"):
            pred.predict_case(case["mr"], label=str(tmp_path / f"{name}.nii.gz"), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_evaluation_reports_failed_case(env, tmp_path):
    dl = {"test": [{"mr": env["cases"][0]["mr"], "label": env["cases"][0]["label"]},
                   {"mr": str(tmp_path / "gone.nii.gz"), "label": env["cases"][0]["label"]}]}
    with pytest.raises(InputError, match="gone.nii.gz"):  # missing files are caught before any case runs
        Predictor(BUNDLE, **env["overrides"]).run(datalist=dl)
    pred = Predictor(BUNDLE, **env["overrides"])
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    dl["test"][1]["mr"] = str(bad)
    with pytest.raises(CaseFailures, match="bad.nii.gz") as err:
        pred.run(datalist=dl, output_dir=tmp_path / "out")
    assert list(err.value.failures) == ["bad"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_0"]  # generic file name: folder name
