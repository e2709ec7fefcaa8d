"""DICOM in and out of the pelvis inference: MR series written here (oblique; x-flipped with descending slices)
go through the bundle's inference with a tiny network, and the CT series, SEG and RTSTRUCT it writes are read
back with SimpleITK, pydicom and highdicom against the input series and the NIfTI outputs."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mtl_med.data import dicom
from mtl_med.inference import dicom_outputs
from mtl_med.data.nifti import check_datalist
from mtl_med.pelvis.phantoms import generate_phantom
from mtl_med.errors import ConfigError, InputError
from mtl_med.inference import Predictor
from mtl_med.inference import check_dicom_outputs, list_cases
from mtl_med.build import sfg_highresnet
from mtl_med.pelvis import LABEL_TABLE
from mtl_med.transforms import learn_landmarks, save_landmarks

hd = pytest.importorskip("highdicom")

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis"
TINY = [4, 8, 8]
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_mr_series(folder, volume, affine_ras, *, study=None, frame=None, series=None, description="T2 axial",
                    patient="Phantom^Pelvis", skip=(), modality="MR"):
    """Write ``volume`` (i, j, k array; voxel (i, j, k) at ``affine_ras @ (i, j, k, 1)``, RAS+ mm) as one file per
    slice k: column i, row j. Files are named in a shuffled order so readers must sort by position. Returns the
    series UID."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, float)
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / sp[0], lps[:3, 1] / sp[1]
    study, frame, series = study or generate_uid(), frame or generate_uid(), series or generate_uid()
    vol = np.rint(np.asarray(volume)).astype(np.int16)
    names = np.random.default_rng(0).permutation(vol.shape[2])
    for k in range(vol.shape[2]):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 3, k + 1
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "PH001", "19600101", "M"
        ds.StudyDate, ds.StudyTime, ds.StudyID = datetime.date(2024, 1, 2).strftime("%Y%m%d"), "101500", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.PatientPosition = "A1", "", "HFS"
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(sp[1]), float(sp[0])]
        ds.SliceThickness = float(sp[2])
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}.dcm", enforce_file_format=True)
    return series


def oblique_affine(spacing=(1.6, 1.4, 3.0), deg=20.0, origin=(-20.0, -15.0, -9.0), flip=False):
    """RAS+ affine rotated about the superior axis by ``deg``; ``flip`` reverses all three axes (columns run
    right to left, rows anterior to posterior, slices descend: a left-handed grid, which ITK reads with the
    slices in the other order)."""
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    if flip:
        rot = -rot
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


STORAGES = {"oblique": oblique_affine(), "flipped": oblique_affine(deg=-15.0, flip=True)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _phantom_mr(seed=3):
    ph = generate_phantom(seed, shape=(24, 20, 6))
    return ph.mr / ph.mr.max() * 1000.0, ph.label


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two MR series (one per storage) in a folder of series folders plus an incomplete one; landmarks and a
    random tiny network; one run of the bundle's predictor writing every DICOM output."""
    root = tmp_path_factory.mktemp("dicom")
    mr, _ = _phantom_mr()
    for name, aff in STORAGES.items():
        write_mr_series(root / "in" / name, mr, aff)
    write_mr_series(root / "in" / "gap", mr, STORAGES["oblique"], skip=(2,))
    save_landmarks(root / "landmarks.json", learn_landmarks([mr]))
    torch.manual_seed(0)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():
        net.heads[0].bias.fill_(1.0)  # synthetic CT around 0 HU, inside the range
        net.heads[1].weight.mul_(20.0)  # labels that follow the image, several organs per case
        net.heads[1].bias.zero_()
    torch.save(net.state_dict(), root / "model.pt")
    pred = Predictor(BUNDLE, ckpt_path=str(root / "model.pt"), landmarks_path=str(root / "landmarks.json"),
                     features=TINY, num_samples=2, max_batch=12, device="cpu", n4=False, progress=False,
                     save_png=False, dicom_outputs=["ct", "seg", "rtstruct"])
    res = pred.run(input_dir=str(root / "in"), output_dir=str(root / "out"), raise_on_failure=False)
    return {"root": root, "pred": pred, "res": res}


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _nifti_as_sitk_layout(path):
    """A NIfTI output as a (k, j, i) array: the layout SimpleITK reads the series in."""
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


@pytest.mark.parametrize("storage", list(STORAGES))
def test_series_read_with_the_geometry_it_was_written_with(env, storage):
    """Every voxel read by ITK sits at the world position it was written at, with its value."""
    mr, _ = _phantom_mr()
    img = dicom.load_series(env["root"] / "in" / storage)
    aff = np.asarray(img.affine, float)
    m = np.linalg.inv(aff) @ STORAGES[storage]  # written index -> read index: a signed permutation
    assert np.allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-6) and np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-4)
    idx = np.indices(mr.shape).reshape(3, -1)
    read_idx = np.rint(m[:3, :3] @ idx + m[:3, 3:]).astype(int)
    np.testing.assert_array_equal(np.asarray(img[0])[tuple(read_idx)], np.rint(mr).reshape(-1))
    if storage == "flipped":  # descending slices: ITK stores them ascending along the normal, k reversed
        assert m[2, 2] == pytest.approx(-1)


def test_mixed_incomplete_and_wrong_series_are_named(tmp_path):
    mr, _ = _phantom_mr()
    aff = STORAGES["oblique"]
    write_mr_series(tmp_path / "gap", mr, aff, skip=(3,))
    with pytest.raises(InputError, match=r"gap: incomplete series: 6 mm between .*3 mm elsewhere"):
        dicom.read_headers(tmp_path / "gap")
    write_mr_series(tmp_path / "mixed", mr, aff, description="T2 axial")
    write_mr_series(tmp_path / "mixed2", mr[:, :, :3], aff, description="T1 axial")
    for f in (tmp_path / "mixed2").iterdir():
        shutil.move(f, tmp_path / "mixed" / f"b_{f.name}")
    with pytest.raises(InputError, match=r"mixed: mixed series: 2 SeriesInstanceUIDs .*T1 axial.*T2 axial"):
        dicom.read_headers(tmp_path / "mixed")
    write_mr_series(tmp_path / "ct", mr, aff, modality="CT")
    with pytest.raises(InputError, match="mr series has modality CT, expected MR"):
        dicom.load_series(tmp_path / "ct")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(InputError, match="no DICOM files"):
        dicom.read_headers(tmp_path / "empty")
    # a datalist may name series folders for "mr"; a folder without DICOM files is refused by name, and the
    # volume checks read the series
    write_mr_series(tmp_path / "good", mr, aff)
    dl = {"test": [{"mr": "good"}, {"mr": "empty"}]}
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    with pytest.raises(InputError, match=r"empty: folder listed as \"mr\" in test\[1\].*holds no DICOM files"):
        check_datalist(tmp_path / "dl.json")
    dl["test"] = [{"mr": "good"}, {"mr": "gap"}]
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    assert list_cases(datalist=tmp_path / "dl.json")[0] == {"mr": str(tmp_path / "good"), "name": "good"}
    with pytest.raises(InputError, match="gap: incomplete series"):
        check_datalist(tmp_path / "dl.json", check_volumes=True, label_table=LABEL_TABLE)


def test_folder_of_series_folders_runs_each_case_once(env):
    res = env["res"]
    assert sorted(res["cases"]) == ["flipped", "oblique"]
    assert list(res["failed"]) == ["gap"] and "incomplete series" in res["failed"]["gap"]
    assert str(env["root"] / "in" / "gap") in res["failed"]["gap"]
    assert not (env["root"] / "out" / "gap").exists()
    assert not [p for p in (env["root"] / "out").rglob(".*")]  # no temporary files left


@pytest.mark.parametrize("storage", list(STORAGES))
def test_ct_series_has_the_source_geometry_and_the_nifti_hu(env, storage):
    src_dir, out = env["root"] / "in" / storage, env["root"] / "out" / storage
    mr, ct = _sitk_series(src_dir), _sitk_series(out / f"{storage}_sct_dicom")
    assert ct.GetSize() == mr.GetSize()
    np.testing.assert_allclose(ct.GetOrigin(), mr.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ct.GetSpacing(), mr.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ct.GetDirection(), mr.GetDirection(), atol=1e-5)
    sct = _nifti_as_sitk_layout(out / f"{storage}_sct.nii.gz")
    hu = sitk.GetArrayFromImage(ct).astype(np.float64)
    assert np.abs(hu - sct).max() <= 0.5 + 1e-3  # integer HU through Rescale Slope / Intercept
    assert np.ptp(sct) > 1  # not a constant image that would pass any comparison
    # the NIfTI outputs lie on the series' grid too (RAS+ affine of the LPS geometry)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(mr.GetDirection()).reshape(3, 3) @ np.diag(mr.GetSpacing())
    lps[:3, 3] = mr.GetOrigin()
    for key in ("sct", "seg", "sct_std", "seg_uncertainty"):
        np.testing.assert_allclose(nib.load(str(out / f"{storage}_{key}.nii.gz")).affine,
                                   np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4, err_msg=key)


def test_ct_series_headers(env):
    src = [pydicom.dcmread(f) for f in sorted((env["root"] / "in" / "oblique").iterdir())]
    files = sorted((env["root"] / "out" / "oblique" / "oblique_sct_dicom").iterdir())
    cts = [pydicom.dcmread(f) for f in files]
    assert len(cts) == len(src)
    by_sop = {s.SOPInstanceUID: s for s in src}
    for ds in cts:
        assert ds.Modality == "CT" and ds.SOPClassUID == dicom_outputs.CT_IMAGE_STORAGE
        for key in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate"):
            assert ds[key].value == src[0][key].value, key
        assert ds.SeriesInstanceUID != src[0].SeriesInstanceUID
        assert "RESEARCH USE ONLY" in ds.SeriesDescription and "RESEARCH USE ONLY" in ds.ImageComments
        assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
        assert "BodyPartExamined" not in src[0] and ds.BodyPartExamined == "PELVIS"  # the bundle's, the MR names none
        assert "Laterality" not in ds  # the pelvis is not a paired part
        ref = by_sop[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]  # the MR slice at the same position
        np.testing.assert_allclose(ds.ImagePositionPatient, ref.ImagePositionPatient, atol=1e-3)
        np.testing.assert_allclose(ds.pixel_array * 1.0 - 1024, ds.pixel_array * ds.RescaleSlope + ds.RescaleIntercept)
    assert len({ds.SeriesInstanceUID for ds in cts}) == 1
    assert len({ds.SOPInstanceUID for ds in cts}) == len(cts) and not {ds.SOPInstanceUID for ds in cts} & set(by_sop)


@pytest.mark.parametrize("storage", list(STORAGES))
def test_seg_and_rtstruct_equal_the_nifti_labels(env, storage):
    from data_prep.goldatlas import rasterise_rtstruct

    src_dir, out = env["root"] / "in" / storage, env["root"] / "out" / storage
    labels = _nifti_as_sitk_layout(out / f"{storage}_seg.nii.gz")
    assert len(np.unique(labels)) >= 3  # several organs, each with its own segment and ROI
    mr = _sitk_series(src_dir)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in mr_files(src_dir)]
    seg = hd.seg.segread(out / f"{storage}_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(mr_files(src_dir)[0]).SeriesInstanceUID
    assert "RESEARCH USE ONLY" in seg.SeriesDescription
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, labels)
    rt_path = out / f"{storage}_rtstruct.dcm"
    rt = pydicom.dcmread(rt_path)
    assert rt.Modality == "RTSTRUCT" and "RESEARCH USE ONLY" in rt.SeriesDescription
    ref_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert [r.ROIName for r in rt.StructureSetROISequence] == [LABEL_TABLE[k] for k in range(1, 6)]
    present = {int(v): LABEL_TABLE[int(v)] for v in np.unique(labels) if v > 0}
    back = rasterise_rtstruct(rt_path, sitk.Cast(mr, sitk.sitkFloat32), present)
    np.testing.assert_array_equal(back, labels)


def mr_files(folder):
    """The series' files in the order SimpleITK stacks them."""
    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))]


def test_writers_keep_every_organ_exactly(tmp_path):
    """The phantom's six labels (organs touching, the bladder with a hole) through SEG and RTSTRUCT on the
    flipped series, back on the grid voxel for voxel."""
    from data_prep.goldatlas import rasterise_rtstruct

    mr, labels = _phantom_mr()
    labels = labels.astype(np.uint8).copy()
    labels[1:6, 1:6, 1:3] = 4
    labels[3, 3, 1] = 0  # a ring: an inner contour on slice 1
    write_mr_series(tmp_path / "mr", mr, STORAGES["flipped"])
    src = dicom.read_headers(tmp_path / "mr")
    img = dicom.load_series(tmp_path / "mr", headers=src)
    m = np.linalg.inv(np.asarray(img.affine, float)) @ STORAGES["flipped"]
    on_grid = np.zeros(src.shape, np.uint8)  # the labels in the read layout
    idx = np.indices(labels.shape).reshape(3, -1)
    on_grid[tuple(np.rint(m[:3, :3] @ idx + m[:3, 3:]).astype(int))] = labels.reshape(-1)
    assert len(np.unique(on_grid)) >= 4
    dicom_outputs.write_rtstruct(on_grid, src, tmp_path / "rt.dcm", label_table=LABEL_TABLE)
    dicom_outputs.write_seg(on_grid, src, tmp_path / "seg.dcm", label_table=LABEL_TABLE)
    expected = on_grid.transpose(2, 1, 0)
    present = {int(v): LABEL_TABLE[int(v)] for v in np.unique(on_grid) if v > 0}
    back = rasterise_rtstruct(tmp_path / "rt.dcm", sitk.Cast(_sitk_series(tmp_path / "mr"), sitk.sitkFloat32), present)
    np.testing.assert_array_equal(back, expected)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in mr_files(tmp_path / "mr")]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(uids, combine_segments=True), expected)


def test_body_part_is_the_sources_else_the_callers(tmp_path):
    """Body Part Examined and Laterality as the MR states them; where it names no body part, the caller's
    ``body_part`` (the pelvis bundle's PELVIS), else none (type 3) with Laterality empty ("unknown"): the writer
    assumes no anatomy."""
    mr, _ = _phantom_mr()
    write_mr_series(tmp_path / "mr", mr, STORAGES["oblique"])
    src = dicom.read_headers(tmp_path / "mr")
    knee = dicom.read_headers(tmp_path / "mr")
    for ds in knee.datasets:
        ds.BodyPartExamined, ds.Laterality = "KNEE", "L"
    for name, source, body_part, expect in (("named", knee, "PELVIS", ("KNEE", "L")),
                                            ("caller", src, "PELVIS", ("PELVIS", None)),
                                            ("none", src, None, (None, ""))):
        out = dicom_outputs.write_ct_series(np.zeros(src.shape), source, tmp_path / name, body_part=body_part)
        ct = pydicom.dcmread(out[0])
        assert (ct.get("BodyPartExamined"), ct.get("Laterality")) == expect, name


def test_organ_codes_colours_and_model_name_are_the_callers(tmp_path):
    """The DICOM writers hold no organ: SNOMED CT codes, ROI colours and the model name come from the caller (the
    pelvis bundle passes mtl_med.pelvis's), else every organ is an anatomical structure in the default colour."""
    from mtl_med.pelvis import MODEL_NAME, ORGAN_CODES, ORGAN_COLOURS

    mr, _ = _phantom_mr()
    write_mr_series(tmp_path / "mr", mr, STORAGES["oblique"])
    src = dicom.read_headers(tmp_path / "mr")
    labels = np.zeros(src.shape, np.uint8)
    labels[...] = (np.arange(src.shape[0]) % len(LABEL_TABLE))[:, None, None]  # every label present
    organs = [lab for lab in sorted(LABEL_TABLE) if lab > 0]
    for name, model, codes, colours in (("pelvis", MODEL_NAME, ORGAN_CODES, ORGAN_COLOURS),
                                        ("neutral", dicom_outputs.DEFAULT_MODEL_NAME, {}, {})):
        named = {"model_name": model} if name == "pelvis" else {}
        seg = pydicom.dcmread(dicom_outputs.write_seg(labels, src, tmp_path / f"{name}_seg.dcm", label_table=LABEL_TABLE,
                                                      organ_codes=codes or None, **named))
        rt = pydicom.dcmread(dicom_outputs.write_rtstruct(labels, src, tmp_path / f"{name}_rt.dcm",
                                                          label_table=LABEL_TABLE, organ_colours=colours or None, **named))
        ct = pydicom.dcmread(dicom_outputs.write_ct_series(np.zeros(src.shape), src, tmp_path / f"{name}_ct", **named)[0])
        assert [(s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
                for s in seg.SegmentSequence] == [codes.get(lab, dicom_outputs.DEFAULT_CODE) for lab in organs]
        assert [tuple(c.ROIDisplayColor) for c in rt.ROIContourSequence] == [
            colours.get(lab, dicom_outputs.DEFAULT_COLOUR) for lab in organs]
        for ds in (seg, rt, ct):
            assert ds.ManufacturerModelName == model
            assert model in ds.ContributingEquipmentSequence[-1].ContributionDescription


def test_dicom_outputs_need_a_dicom_input_and_known_choices(env, tmp_path):
    mr, _ = _phantom_mr()
    nib.save(nib.Nifti1Image(mr.astype(np.float32), STORAGES["oblique"]), str(tmp_path / "case.nii.gz"))
    res = env["pred"].run(input_dir=str(tmp_path), output_dir=str(tmp_path / "out"), raise_on_failure=False)
    assert "need a DICOM MR series folder as input" in res["failed"]["case"]
    assert str(tmp_path / "case.nii.gz") in res["failed"]["case"]
    with pytest.raises(ConfigError, match=r"dicom_outputs: unknown DICOM outputs \['nifti'\]"):
        check_dicom_outputs(["ct", "nifti"])
    assert check_dicom_outputs("seg") == ("seg",)


def test_a_ct_series_is_read_as_the_reference_ct(env, tmp_path):
    """Evaluation items may name a CT series for "ct" too; an MR series there is refused by its modality."""
    mr, _ = _phantom_mr()
    hu = np.linspace(-1000, 1500, mr.size).reshape(mr.shape)
    write_mr_series(tmp_path / "ct", hu, STORAGES["oblique"], modality="CT")
    item = env["pred"].read_dicom_inputs({"mr": str(env["root"] / "in" / "oblique"), "ct": str(tmp_path / "ct")})
    np.testing.assert_allclose(np.asarray(item["ct"].affine), np.asarray(item["mr"].affine), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(item["ct"][0]), np.rint(hu))
    assert item["dicom_mr"].folder == env["root"] / "in" / "oblique"
    with pytest.raises(InputError, match="ct series has modality MR, expected CT"):
        env["pred"].read_dicom_inputs({"mr": str(env["root"] / "in" / "oblique"), "ct": str(env["root"] / "in" / "oblique")})


def test_a_failing_dicom_writer_leaves_no_outputs(env, tmp_path, monkeypatch):
    """The DICOM files are part of the case's output set: all of it appears, or none (no NIfTI without them)."""
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dicom_outputs, "write_rtstruct", broken)
    res = env["pred"].run(input_dir=str(env["root"] / "in" / "oblique"), output_dir=str(tmp_path),
                          raise_on_failure=False)
    assert "disk full" in res["failed"]["oblique"]
    assert list(tmp_path.iterdir()) == []


def test_training_loader_reads_series_folders_as_inference_does(env, tmp_path):
    """LoadVolumesd (training and evaluation preprocessing) takes a DICOM MR series where a NIfTI is accepted."""
    from mtl_med.transforms import LoadVolumesd

    folder = env["root"] / "in" / "oblique"
    ref = dicom.load_series(folder)
    mr, label = _phantom_mr()
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.asarray(ref.affine, float)), tmp_path / "label.nii.gz")
    d = LoadVolumesd(("mr", "label"), label_table=LABEL_TABLE)({"mr": str(folder), "label": str(tmp_path / "label.nii.gz")})
    assert torch.equal(d["mr"].as_tensor(), ref.as_tensor()) and np.allclose(d["mr"].affine, ref.affine)
    assert d["label"].shape == d["mr"].shape
    with pytest.raises(InputError, match="label is a folder"):
        LoadVolumesd(("mr", "label"), label_table=LABEL_TABLE)({"mr": str(folder), "label": str(folder)})
    with pytest.raises(InputError, match="gap"):
        LoadVolumesd(("mr",))({"mr": str(env["root"] / "in" / "gap")})
