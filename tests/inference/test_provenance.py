"""Provenance of the pelvis predictor's outputs: every NIfTI's descrip names the package, the model and the
weights' MD5; each case folder holds a run record (input digests, weights and landmarks MD5, settings, software,
machine, timings) that belongs to the case's complete set; the DICOM outputs name the model and weights as
contributing equipment (and the SEG as its algorithm) and still pass dciodvfy; every file written is readable
like the inputs (0644 under umask 022). And the release's CITATION.cff is valid YAML with the five papers.

One tiny SFG-HighResNet (random weights, widths 4/8/8) predicts one phantom given as NIfTI (through the
evaluation, so the metrics files are written too) and as a DICOM MR series (every DICOM output)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml

import mtl_med
from mtl_med.data import dicom
from mtl_med.inference import dicom_outputs, provenance
from mtl_med.pelvis.phantoms import generate_phantom, write_phantom
from mtl_med.inference import Predictor
from mtl_med.inference import evaluate_cases
from mtl_med.build import sfg_highresnet
from mtl_med.transforms import learn_landmarks, save_landmarks

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]
NIFTI_OUTPUTS = ("sct", "seg", "sct_std", "seg_uncertainty")
DCIODVFY = shutil.which("dciodvfy")


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One phantom as NIfTI files (MR, CT, labels) and as a DICOM MR series; landmarks and a random tiny
    checkpoint; an evaluation of the NIfTI case with its outputs saved, and a run over the series with every DICOM
    output and a summary, both under umask 022."""
    root = tmp_path_factory.mktemp("provenance")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mask = os.umask(0o022)
    try:
        ph = generate_phantom(210, shape=(32, 28, 6))
        files = write_phantom(ph, root / "phantom")
        save_landmarks(root / "landmarks.json", learn_landmarks([nib.load(files["mr"]).get_fdata()]))
        torch.manual_seed(0)
        net = sfg_highresnet(features=TINY)
        with torch.no_grad():  # synthetic CT around 0 HU, organs that follow the image
            net.heads[0].bias.fill_(1.0)
            net.heads[1].weight.mul_(20.0)
        torch.save(net.state_dict(), root / "model.pt")
        overrides = {"ckpt_path": str(root / "model.pt"), "landmarks_path": str(root / "landmarks.json"),
                     "features": TINY, "num_samples": 2, "max_batch": 8, "margin": 4, "device": "cpu", "n4": False,
                     "progress": False, "seed": 3}

        nifti = Predictor(BUNDLE, **overrides, save_png=True)
        datalist = {"test": [{"name": "case", "mr": files["mr"], "ct": files["ct"], "label": files["label"]}]}
        evaluate_cases(nifti, datalist, output_dir=root / "out", save_outputs=True)

        dicom.write_mr_series(ph.mr / ph.mr.max() * 1000.0, ph.mr_affine, root / "series" / "t2")
        config = [BUNDLE / "configs" / "inference.json"]
        series = provenance.set_config_source(
            Predictor(BUNDLE, config_file=config, **overrides, save_png=False, dicom_outputs=["ct", "seg", "rtstruct"]),
            BUNDLE, config, overrides)
        series.run(input_dir=root / "series", output_dir=root / "dcm_out",
                   summary_path=root / "dcm_out" / "inference_summary.json")
    finally:
        os.umask(mask)
        torch.set_num_threads(threads)
    return {"root": root, "files": files, "nifti": nifti, "series": series, "overrides": overrides,
            "md5": _md5(root / "model.pt")}


def _record(folder: Path, case: str) -> dict:
    return json.loads((folder / case / f"{case}_run.json").read_text())


# ----------------------------------------------------------------------------------------------- NIfTI
def test_every_nifti_names_the_package_model_and_weights(env):
    md5 = env["md5"][:8]
    bundle = f"mtl_med {mtl_med.__version__} sfg_highresnet_pelvis 0.1.0 md5:{md5}"  # Predictor: built from its config
    want = {"out": bundle, "dcm_out": bundle}
    for folder, case in (("out", "case"), ("dcm_out", "t2")):
        for key in NIFTI_OUTPUTS:
            img = nib.load(env["root"] / folder / case / f"{case}_{key}.nii.gz")
            assert img.header["descrip"].item().decode() == want[folder], (folder, key)


def test_shipped_weights_identify_their_bundle_and_md5():
    """The demonstration weights name their bundle (above the checkpoint) and the MD5 of large_files.yml."""
    listed = {e["path"]: e["hash_val"] for e in yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]}
    fake = SimpleNamespace(ckpt_path=BUNDLE / "models" / "demo" / "model.pt", network=torch.nn.Identity(),
                           _preprocessing=None)
    ident = provenance.model_identity(fake)
    version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert (ident.name, ident.version, ident.weights_md5) == ("sfg_highresnet_pelvis", version, listed["models/demo/model.pt"])
    assert ident.descrip() == f"mtl_med {mtl_med.__version__} sfg_highresnet_pelvis {version} md5:{listed['models/demo/model.pt'][:8]}"


def test_descrip_fits_the_nifti_field_whatever_the_name():
    ident = provenance.ModelIdentity("0.1.0", "a_very_long_bundle_name_" * 5, "12.3.4", weights_md5="0123456789abcdef" * 2)
    text = ident.descrip()
    assert len(text.encode()) <= 80 and text.startswith("mtl_med 0.1.0 a_very") and text.endswith(" md5:01234567")
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header["descrip"] = text  # nibabel refuses more than 80 bytes


# ----------------------------------------------------------------------------------------------- run record
def test_run_record_holds_input_digests_weights_settings_and_timings(env):
    root, files = env["root"], env["files"]
    rec = _record(root / "out", "case")
    assert rec["case"] == "case"
    for role in ("mr", "ct", "label"):
        assert rec["inputs"][role]["sha256"] == _sha256(files[role]), role
        assert rec["inputs"][role]["path"] == str(Path(files[role]).resolve())
    model = rec["model"]
    assert model["weights_md5"] == env["md5"] and model["weights_path"] == str((root / "model.pt").resolve())
    assert model["landmarks_md5"] == _md5(root / "landmarks.json")
    assert model["landmarks_path"] == str((root / "landmarks.json").resolve())
    s = rec["settings"]
    assert (s["num_samples"], s["seed"], s["margin"], s["max_batch"], s["inference_mode"]) == (2, 3, 4, 8, "sample")
    assert s["preprocessing"]["n4"] is False and s["preprocessing"]["pixdim"] == [1.46, 1.46, 1.46]
    assert {"engine", "dtype", "uncertainty", "ct_clip", "dicom_outputs", "postfixes"} <= set(s)
    assert {"mtl_med", "torch", "monai", "numpy", "nibabel", "SimpleITK", "pydicom"} <= set(rec["software"])
    assert rec["software"]["torch"] == torch.__version__.split("+")[0] or rec["software"]["torch"] == torch.__version__
    assert rec["machine"]["device"] == "cpu" and rec["machine"]["cpu"]
    t = rec["timings_s"]
    assert all(t[k] >= 0 for k in ("read_and_preprocess", "inference", "resampling", "writing")), t
    assert rec["passes"] == {"num_samples": 2, "adaptive": False}
    assert 0 <= rec["metrics"]["dice_mean"] <= 1
    created = datetime.datetime.fromisoformat(rec["created_utc"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    assert sorted(rec["outputs"]) == sorted(p.name for p in (root / "out" / "case").iterdir())


def test_run_record_of_a_series_hashes_its_sorted_files_and_keeps_the_config(env):
    root = env["root"]
    rec = _record(root / "dcm_out", "t2")
    series = root / "series" / "t2"
    names = sorted(p.name for p in series.iterdir())
    mr = rec["inputs"]["mr"]
    assert mr["kind"] == "dicom series" and mr["files"] == {n: _sha256(series / n) for n in names}
    listing = "".join(f"{_sha256(series / n)}  {n}\n" for n in names)  # sha256sum of the sorted files
    assert mr["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    src = rec["config_source"]
    assert src["bundle_root"] == str(BUNDLE.resolve())
    assert src["config_files"] == [str((BUNDLE / "configs" / "inference.json").resolve())]
    assert src["overrides"]["ckpt_path"] == env["overrides"]["ckpt_path"]
    assert rec["settings"]["dicom_outputs"] == ["ct", "seg", "rtstruct"]
    assert rec["timings_s"]["read_and_preprocess"] >= 0
    assert sorted(rec["outputs"]) == sorted(p.name for p in (root / "dcm_out" / "t2").iterdir())


def test_run_record_of_an_in_memory_input(env, tmp_path):
    img = nib.load(env["files"]["mr"])
    out = env["nifti"].predict_case(np.asarray(img.dataobj), affine=img.affine, output_dir=tmp_path, case="mem")
    rec = json.loads(Path(out["paths"]["run_record"]).read_text())
    assert rec["inputs"]["mr"]["kind"] == "in memory" and len(rec["inputs"]["mr"]["sha256"]) == 64
    assert rec["inputs"]["mr"]["shape"][-3:] == list(img.shape)
    assert rec["model"]["weights_md5"] == env["md5"]


def test_run_record_belongs_to_the_complete_set(env, tmp_path):
    """A case folder without its run record is not complete: skip_existing runs it again."""
    pred = env["nifti"]
    assert pred.output_paths("case", env["root"] / "out")["run_record"].name == "case_run.json"
    assert pred.complete("case", env["root"] / "out")
    shutil.copytree(env["root"] / "out" / "case", tmp_path / "case")
    (tmp_path / "case" / "case_run.json").unlink()
    assert not pred.complete("case", tmp_path)


# ----------------------------------------------------------------------------------------------- DICOM
def _processing_equipment(ds) -> list:
    return [e for e in ds.get("ContributingEquipmentSequence", [])
            if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and e.Manufacturer == "mtl_med"]


def test_dicom_outputs_name_the_model_and_the_weights_md5(env):
    case = env["root"] / "dcm_out" / "t2"
    md5 = env["md5"]
    ct = [pydicom.dcmread(p) for p in sorted((case / "t2_sct_dicom").iterdir())]
    seg = pydicom.dcmread(case / "t2_seg.dcm")
    rt = pydicom.dcmread(case / "t2_rtstruct.dcm")
    for ds in (*ct, seg, rt):
        (eq,) = _processing_equipment(ds)
        assert eq.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
        assert eq.DeviceSerialNumber == md5
        assert list(eq.SoftwareVersions) == [f"mtl_med {mtl_med.__version__}", "sfg_highresnet_pelvis 0.1.0",
                                             f"weights md5 {md5}"]
    assert all(md5 in ds.DerivationDescription for ds in ct)
    for segment in seg.SegmentSequence:
        (algo,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algo.AlgorithmName and "sfg_highresnet_pelvis 0.1.0" in algo.AlgorithmVersion
        assert f"weights_md5={md5}" in algo.AlgorithmParameters


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dicom_outputs_with_provenance_pass_dciodvfy(env):
    case = env["root"] / "dcm_out" / "t2"
    for path in (sorted((case / "t2_sct_dicom").iterdir())[0], case / "t2_seg.dcm", case / "t2_rtstruct.dcm"):
        run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)


# ----------------------------------------------------------------------------------------------- permissions
def test_every_file_written_is_readable_like_the_inputs(env):
    """Under umask 022 every file is 0644 and every folder 0755: NIfTI, PNG, DICOM, run records, metrics
    CSV and summaries, the inference summary."""
    root = env["root"]
    found = [p for d in ("out", "dcm_out") for p in (root / d).rglob("*")]
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in found}
    files = {k: m for k, m in modes.items() if not (root / k).is_dir()}
    folders = {k: m for k, m in modes.items() if (root / k).is_dir()}
    suffixes = {Path(k).suffix for k in files}
    assert {".gz", ".png", ".json", ".csv", ".dcm"} <= suffixes, suffixes
    assert {"out/metrics.csv", "out/metrics_summary.json", "dcm_out/inference_summary.json",
            "out/case/case_run.json", "dcm_out/t2/t2_run.json"} <= set(files)
    assert {k: oct(m) for k, m in files.items() if m != 0o644} == {}
    assert {k: oct(m) for k, m in folders.items() if m != 0o755} == {}


# ----------------------------------------------------------------------------------------------- release files
def test_citation_cff_is_yaml_with_the_five_papers():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["version"] == mtl_med.__version__
    assert cff["license"] == "Apache-2.0"
    refs = cff["references"]
    assert len(refs) == 5
    for ref in refs:
        assert ref["title"] and ref["authors"] and ref["year"], ref
        assert all(a.get("family-names") for a in ref["authors"]), ref["title"]
    assert any("Stochastic Filter Groups" in r["title"] for r in refs)
